// Spill file format: round trip, file naming, and every way a file can be untrustworthy
// (flipped byte, truncation, wrong magic, other version, misnamed) raising CacheCorruption.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <vector>

#include "cache_test_util.h"
#include "stackwise/spill_format.h"

using namespace stackwise::core;
using stackwise::core::testing::make_entry;
using stackwise::core::testing::same_entry;
using stackwise::core::testing::TempDir;
namespace fs = std::filesystem;

namespace {

std::vector<char> slurp(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), {}};
}
void dump(const std::string& p, const std::vector<char>& b) {
  std::ofstream f(p, std::ios::binary | std::ios::trunc);
  f.write(b.data(), std::streamsize(b.size()));
}
std::string written_file(const TempDir& d, CacheKey key) {
  return write_spill_file(d.path, key, *make_entry(16, 8, 3)).first;
}

}  // namespace

TEST(SpillFormat, RoundTrip) {
  TempDir d;
  auto e = make_entry(33, 17, 5);
  auto [path, size] = write_spill_file(d.path, {2, -7}, *e, {0xab, 5});
  EXPECT_EQ(fs::path(path).filename().string(), "blk2_batch-7.00000000000000ab-5.swspill");
  EXPECT_EQ(fs::file_size(path), size);
  CacheKey key{2, -7};
  EntryData back = read_spill_file(path, &key);
  EXPECT_TRUE(same_entry(*e, back));
  SpillHeader h = read_spill_header(path);
  EXPECT_EQ(h.key, key);
  EXPECT_EQ(h.owner, (SpillOwner{0xab, 5}));
  EXPECT_EQ(h.payload_bytes, e->payload_bytes());
  // Only the final file is left: the temporary one was renamed.
  EXPECT_EQ(std::distance(fs::directory_iterator(d.path), fs::directory_iterator{}), 1);
}

TEST(SpillFormat, RoundTripAcrossWritebackChunks) {
  // 2600 x 2048 float32 = 20.3 MiB: several 8 MiB write-back chunks, each checksummed as written.
  TempDir d;
  auto e = make_entry(2600, 2048, 11);
  auto [path, size] = write_spill_file(d.path, {0, 1}, *e);
  EXPECT_EQ(fs::file_size(path), size);
  EXPECT_TRUE(same_entry(*e, read_spill_file(path)));
}

TEST(SpillFormat, FileNames) {
  CacheKey k;
  SpillOwner o;
  EXPECT_TRUE(parse_spill_file_name("blk3_batch42.0123456789abcdef-7.swspill", &k, &o));
  EXPECT_EQ(k, (CacheKey{3, 42}));
  EXPECT_EQ(o, (SpillOwner{0x0123456789abcdefull, 7}));
  EXPECT_FALSE(parse_spill_file_name("blk3_batch42.0123456789abcdef-7.swspill.tmp", &k, &o));
  EXPECT_FALSE(parse_spill_file_name("blk03_batch42.0123456789abcdef-7.swspill", &k, &o));
  EXPECT_FALSE(parse_spill_file_name("blk3_batch42.swspill", &k, &o));  // version 1 name
  EXPECT_FALSE(parse_spill_file_name("notes.txt", &k, &o));
}

TEST(SpillFormat, RecordValidation) {
  auto e = make_entry(4, 4, 1);
  e->records[0].shape = {4, 5};
  EXPECT_THROW(validate_record(e->records[0]), std::invalid_argument);
  EXPECT_EQ(expected_payload_bytes(DType::kFloat32, Storage::kInt8, {3, 10}), 30u + 12u);
  EXPECT_EQ(expected_payload_bytes(DType::kFloat32, Storage::kFloat16, {3, 10}), 60u);
  EXPECT_EQ(expected_payload_bytes(DType::kFloat64, Storage::kAsIs, {}), 8u);
}

TEST(SpillFormat, FlippedPayloadByteIsDetected) {
  TempDir d;
  const std::string p = written_file(d, {0, 0});
  auto b = slurp(p);
  b[b.size() - 100] ^= 0x10;
  dump(p, b);
  try {
    read_spill_file(p);
    FAIL() << "no error";
  } catch (const CacheCorruption& e) {
    EXPECT_EQ(e.path(), p);
    EXPECT_NE(std::string(e.what()).find("checksum"), std::string::npos);
  }
}

TEST(SpillFormat, FlippedHeaderByteIsDetected) {
  TempDir d;
  const std::string p = written_file(d, {0, 0});
  auto b = slurp(p);
  b[kSpillFixedHeaderBytes + 3] ^= 0x01;  // inside the block index
  dump(p, b);
  EXPECT_THROW(read_spill_file(p), CacheCorruption);
}

TEST(SpillFormat, TruncationIsDetected) {
  TempDir d;
  const std::string p = written_file(d, {0, 0});
  auto b = slurp(p);
  for (size_t keep : {size_t(0), size_t(5), size_t(20), size_t(60), b.size() - 1}) {
    dump(p, std::vector<char>(b.begin(), b.begin() + long(keep)));
    EXPECT_THROW(read_spill_file(p), CacheCorruption) << "kept " << keep;
    EXPECT_THROW(read_spill_header(p), CacheCorruption) << "kept " << keep;
  }
}

TEST(SpillFormat, ForeignFileIsDetected) {
  TempDir d;
  const std::string p = d.path + "/blk0_batch0.swspill";
  dump(p, std::vector<char>(4096, 'x'));
  try {
    read_spill_header(p);
    FAIL() << "no error";
  } catch (const CacheCorruption& e) {
    EXPECT_NE(std::string(e.what()).find("magic"), std::string::npos);
  }
}

TEST(SpillFormat, OtherVersionIsDetected) {
  TempDir d;
  const std::string p = written_file(d, {0, 0});
  auto b = slurp(p);
  b[8] = 9;
  dump(p, b);
  EXPECT_THROW(read_spill_header(p), CacheCorruption);
}

TEST(SpillFormat, MisnamedFileIsDetected) {
  TempDir d;
  const std::string p = written_file(d, {1, 2});
  CacheKey other{1, 3};
  EXPECT_THROW(read_spill_file(p, &other), CacheCorruption);
}

// A file is read back only when it carries the owner (store, generation) the reader recorded.
TEST(SpillFormat, OtherOwnerIsDetected) {
  TempDir d;
  auto e = make_entry(4, 4, 1);
  const std::string p = write_spill_file(d.path, {1, 2}, *e, {7, 3}).first;
  CacheKey key{1, 2};
  SpillOwner mine{7, 3}, other_store{8, 3}, other_gen{7, 4};
  EXPECT_TRUE(same_entry(*e, read_spill_file(p, &key, nullptr, nullptr, &mine)));
  EXPECT_THROW(read_spill_file(p, &key, nullptr, nullptr, &other_store), CacheCorruption);
  EXPECT_THROW(read_spill_file(p, &key, nullptr, nullptr, &other_gen), CacheCorruption);
}
