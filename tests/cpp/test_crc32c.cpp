// Torch-free tests of cpp/core: CRC-32C against published check values, incremental use, and
// the hardware path against the table path.
#include <gtest/gtest.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "stackwise/crc32c.h"

using stackwise::core::crc32c;
using stackwise::core::crc32c_update;
using stackwise::core::crc32c_update_software;

TEST(Crc32c, CheckValue) {
  const std::string s = "123456789";
  EXPECT_EQ(crc32c(s.data(), s.size()), 0xE3069283u);
  EXPECT_EQ(crc32c_update_software(0, s.data(), s.size()), 0xE3069283u);
}

TEST(Crc32c, Empty) { EXPECT_EQ(crc32c(nullptr, 0), 0u); }

TEST(Crc32c, Rfc3720Vectors) {
  // RFC 3720 B.4: 32 bytes of zeros, of 0xFF, and an ascending sequence.
  std::vector<uint8_t> zeros(32, 0), ones(32, 0xFF), inc(32);
  for (int i = 0; i < 32; ++i) inc[i] = static_cast<uint8_t>(i);
  EXPECT_EQ(crc32c(zeros.data(), 32), 0x8A9136AAu);
  EXPECT_EQ(crc32c(ones.data(), 32), 0x62A8AB43u);
  EXPECT_EQ(crc32c(inc.data(), 32), 0x46DD794Eu);
}

TEST(Crc32c, IncrementalEqualsOneShot) {
  std::mt19937 rng(7);
  std::vector<uint8_t> buf(1237);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  const uint32_t whole = crc32c(buf.data(), buf.size());
  for (size_t cut : {size_t(0), size_t(1), size_t(7), size_t(8), size_t(600), buf.size()}) {
    uint32_t c = crc32c_update(0, buf.data(), cut);
    c = crc32c_update(c, buf.data() + cut, buf.size() - cut);
    EXPECT_EQ(c, whole) << "cut at " << cut;
  }
}

TEST(Crc32c, HardwareMatchesTable) {
  std::mt19937 rng(11);
  for (size_t n : {size_t(1), size_t(3), size_t(8), size_t(63), size_t(4096), size_t(100003)}) {
    std::vector<uint8_t> buf(n);
    for (auto& b : buf) b = static_cast<uint8_t>(rng());
    // Unaligned start as well as aligned.
    for (size_t off : {size_t(0), size_t(1)}) {
      if (off >= n) continue;
      EXPECT_EQ(crc32c_update(0, buf.data() + off, n - off),
                crc32c_update_software(0, buf.data() + off, n - off))
          << "n=" << n << " off=" << off;
    }
  }
}

// Spans of three interleaved 8 KiB streams and their edges: the joined CRC must equal the
// table implementation's, also when a long span is fed in pieces that cut a block.
TEST(Crc32c, InterleavedStreamsMatchTable) {
  std::mt19937 rng(13);
  std::vector<uint8_t> buf(3 * 24576 + 77);
  for (auto& b : buf) b = static_cast<uint8_t>(rng());
  for (size_t n : {size_t(24575), size_t(24576), size_t(24577), size_t(49152 + 8), buf.size()}) {
    EXPECT_EQ(crc32c_update(0, buf.data(), n), crc32c_update_software(0, buf.data(), n))
        << "n=" << n;
    EXPECT_EQ(crc32c_update(0x12345678u, buf.data() + 3, n - 3),
              crc32c_update_software(0x12345678u, buf.data() + 3, n - 3))
        << "n=" << n;
  }
  const uint32_t whole = crc32c_update_software(0, buf.data(), buf.size());
  for (size_t cut : {size_t(5), size_t(24576), size_t(30001)}) {
    uint32_t c = crc32c_update(0, buf.data(), cut);
    EXPECT_EQ(crc32c_update(c, buf.data() + cut, buf.size() - cut), whole) << "cut at " << cut;
  }
}

TEST(Crc32c, DetectsSingleBitFlip) {
  std::vector<uint8_t> buf(512, 0x5A);
  const uint32_t before = crc32c(buf.data(), buf.size());
  buf[300] ^= 0x04;
  EXPECT_NE(crc32c(buf.data(), buf.size()), before);
}
