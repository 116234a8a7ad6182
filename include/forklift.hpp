// forklift - multiprocessing done right: every public header in one include.
#pragma once

#include "forklift/channel.hpp"
#include "forklift/error.hpp"
#include "forklift/fork_server.hpp"
#include "forklift/log.hpp"
#include "forklift/manager.hpp"
#include "forklift/message.hpp"
#include "forklift/pool.hpp"
#include "forklift/process.hpp"
#include "forklift/ring_buffer.hpp"
#include "forklift/sync.hpp"
#include "forklift/shm.hpp"
#include "forklift/shm_array.hpp"
#include "forklift/shm_tensor.hpp"
#include "forklift/timeout.hpp"
#include "forklift/value.hpp"
