#include <gtest/gtest.h>
#include "forklift/dds/publisher.hpp"
#include "forklift/dds/subscriber.hpp"
int main(int argc, char** argv) { ::testing::InitGoogleTest(&argc, argv); return RUN_ALL_TESTS(); }
