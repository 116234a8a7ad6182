// forklift - multiprocessing done right: every public header in one include.
#pragma once

#include "forklift/channel.hpp"
#include "forklift/error.hpp"
#include "forklift/message.hpp"
#include "forklift/shm.hpp"
#include "forklift/shm_array.hpp"
#include "forklift/timeout.hpp"
#include "forklift/value.hpp"
