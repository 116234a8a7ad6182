// Replays a libFuzzer corpus through a fuzz target's LLVMFuzzerTestOneInput,
// in the normal (gcc) build: every file of $FORKLIFT_FUZZ_CORPUS, one test
// case per target. An input that crashes or trips a sanitizer fails it.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size);

namespace {

TEST(FuzzCorpus, EveryInputIsHandled) {
  const char* dir = std::getenv("FORKLIFT_FUZZ_CORPUS");
  ASSERT_NE(dir, nullptr) << "FORKLIFT_FUZZ_CORPUS is not set";
  std::vector<std::filesystem::path> files;
  for (const auto& e : std::filesystem::directory_iterator(dir))
    if (e.is_regular_file()) files.push_back(e.path());
  ASSERT_GE(files.size(), 3u) << "the corpus in " << dir << " is (nearly) empty";
  for (const auto& f : files) {
    SCOPED_TRACE(f.string());
    std::ifstream in(f, std::ios::binary);
    const std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    EXPECT_EQ(LLVMFuzzerTestOneInput(reinterpret_cast<const std::uint8_t*>(bytes.data()), bytes.size()), 0);
  }
  std::printf("replayed %zu inputs from %s\n", files.size(), dir);
}

}  // namespace
