// CacheStoreCore under the conditions that used to lose entries: concurrent replacing puts and
// gets, two stores sharing one spill directory, and a disk that refuses writes (simulated with
// RLIMIT_FSIZE, which makes write() fail with EFBIG as a full disk fails with ENOSPC). Run
// under TSan with -DSTACKWISE_SANITIZE=thread as well.
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>

#include <atomic>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "cache_test_util.h"
#include "stackwise/cache_store_core.h"

using namespace stackwise::core;
using stackwise::core::testing::count_spill_files;
using stackwise::core::testing::make_entry;
using stackwise::core::testing::same_entry;
using stackwise::core::testing::spill_file;
using stackwise::core::testing::TempDir;
namespace fs = std::filesystem;

namespace {
constexpr uint64_t kEntryBytes = 8 * 8 * 4 + 8;  // make_entry(8, 8, s)
std::shared_ptr<EntryData> entry(uint32_t seed) { return make_entry(8, 8, seed); }

// Lowers the file-size limit for its lifetime: writes past `bytes` fail (EFBIG).
struct FileSizeLimit {
  explicit FileSizeLimit(rlim_t bytes) {
    ::signal(SIGXFSZ, SIG_IGN);
    ::getrlimit(RLIMIT_FSIZE, &saved);
    rlimit lim = saved;
    lim.rlim_cur = bytes;
    ::setrlimit(RLIMIT_FSIZE, &lim);
  }
  ~FileSizeLimit() { ::setrlimit(RLIMIT_FSIZE, &saved); }
  rlimit saved{};
};
}  // namespace

// Three threads replace their keys over and over while three read any key: every get succeeds,
// and at the end every key holds its last value, on disk or in memory.
TEST(CacheStoreSafety, ConcurrentReplaceAndGetLoseNothing) {
  TempDir d;
  CacheStoreCore s({0, 2}, d.path);
  constexpr int kKeys = 12, kRounds = 30, kWriters = 3, kReaders = 3;
  for (int k = 0; k < kKeys; ++k) s.put({0, k}, entry(uint32_t(k * 1000)));
  std::atomic<int> errors{0};
  std::atomic<bool> done{false};
  std::vector<std::thread> ts;
  for (int w = 0; w < kWriters; ++w)
    ts.emplace_back([&, w] {
      for (int r = 1; r <= kRounds; ++r)
        for (int k = w; k < kKeys; k += kWriters) s.put({0, k}, entry(uint32_t(k * 1000 + r)));
    });
  for (int t = 0; t < kReaders; ++t)
    ts.emplace_back([&, t] {
      for (int i = 0; !done.load(); ++i) {
        try {
          s.get({0, (i * 7 + t) % kKeys}, /*release=*/(i % 3) == 0);
        } catch (const std::exception& e) {
          ADD_FAILURE() << e.what();
          ++errors;
        }
      }
    });
  for (int w = 0; w < kWriters; ++w) ts[w].join();
  done = true;
  for (size_t i = kWriters; i < ts.size(); ++i) ts[i].join();
  EXPECT_EQ(errors.load(), 0);
  EXPECT_EQ(s.stats().entries, uint64_t(kKeys));
  for (int k = 0; k < kKeys; ++k)
    EXPECT_TRUE(same_entry(*s.get({0, k}), *entry(uint32_t(k * 1000 + kRounds)))) << k;
  auto st = s.stats();
  EXPECT_EQ(count_spill_files(d.path), long(st.entries_on_disk));
}

// Two stores given one spill directory keep to their own files: neither reads the other's
// values, and closing one leaves the other's files.
TEST(CacheStoreSafety, TwoStoresShareADirectorySafely) {
  TempDir d;
  CacheStoreCore a({kEntryBytes, 0}, d.path), b({kEntryBytes, 0}, d.path);
  EXPECT_NE(a.store_id(), b.store_id());
  for (uint32_t i = 0; i < 4; ++i) {
    a.put({0, i}, entry(100 + i));
    b.put({0, i}, entry(200 + i));
  }
  EXPECT_EQ(count_spill_files(d.path), 6);  // three spilled by each
  for (uint32_t i = 0; i < 4; ++i) {
    EXPECT_TRUE(same_entry(*a.get({0, i}), *entry(100 + i))) << i;
    EXPECT_TRUE(same_entry(*b.get({0, i}), *entry(200 + i))) << i;
  }
  a.close();
  for (uint32_t i = 0; i < 4; ++i) EXPECT_TRUE(same_entry(*b.get({0, i}), *entry(200 + i))) << i;
}

// A reopening store adopts only the files of stores that are gone: a live store's files stay
// its own until it closes.
TEST(CacheStoreSafety, ReopenLeavesALiveStoresFiles) {
  TempDir d;
  CacheStoreCore live({kEntryBytes, 0}, d.path);
  for (uint32_t i = 0; i < 3; ++i) live.put({1, i}, entry(i));
  {
    CacheStoreCore r({0, 0}, d.path, /*reopen=*/true);
    EXPECT_EQ(r.stats().entries, 0u);
  }
  for (uint32_t i = 0; i < 3; ++i) EXPECT_TRUE(same_entry(*live.get({1, i}), *entry(i)));
  live.close(/*keep_files=*/true);
  CacheStoreCore r({0, 0}, d.path, /*reopen=*/true);
  EXPECT_EQ(r.stats().entries, 3u);
  for (uint32_t i = 0; i < 3; ++i) EXPECT_TRUE(same_entry(*r.get({1, i}), *entry(i)));
}

// A valid spill file put in place of a store's own (same key, another writer) is refused, not
// read as the entry.
TEST(CacheStoreSafety, FileFromAnotherWriterIsRefused) {
  TempDir d;
  CacheStoreCore s({kEntryBytes, 0}, d.path);
  s.put({0, 0}, entry(1));
  s.put({0, 1}, entry(2));  // spills {0, 0}
  const std::string mine = spill_file(d.path, {0, 0});
  ASSERT_FALSE(mine.empty());
  TempDir other;
  const std::string theirs = write_spill_file(other.path, {0, 0}, *entry(3), {12345, 1}).first;
  fs::copy_file(theirs, mine, fs::copy_options::overwrite_existing);
  EXPECT_THROW(s.get({0, 0}), CacheCorruption);
}

// With the disk refusing writes: a put that needs room raises and has stored nothing, the
// entries it tried to move stay readable, and reading a spilled entry still works.
TEST(CacheStoreSafety, FullDiskPutStoresNothingAndReadsWork) {
  TempDir d;
  CacheStoreCore s({0, 2}, d.path);
  for (uint32_t i = 0; i < 3; ++i) s.put({0, i}, entry(i));  // {0, 0} on disk
  ASSERT_EQ(s.stats().entries_on_disk, 1u);
  {
    FileSizeLimit full(64);  // smaller than any spill file
    EXPECT_THROW(s.put({0, 3}, entry(3)), CacheIOError);
    EXPECT_FALSE(s.contains({0, 3}));
    EXPECT_EQ(s.stats().entries, 3u);
    EXPECT_GE(s.stats().write_errors, 1u);
    for (uint32_t i = 0; i < 3; ++i) EXPECT_TRUE(same_entry(*s.get({0, i}), *entry(i))) << i;
    EXPECT_LE(s.stats().entries_in_memory, 2u);
    s.put({0, 1}, entry(11));  // replacing an in-memory entry needs no write
    EXPECT_TRUE(same_entry(*s.get({0, 1}), *entry(11)));
    // An entry larger than the byte budget goes straight to disk: refused as a whole.
    CacheStoreCore small({16, 0}, d.path);
    EXPECT_THROW(small.put({5, 5}, entry(5)), CacheIOError);
    EXPECT_FALSE(small.contains({5, 5}));
  }
  s.put({0, 3}, entry(3));  // the disk has room again
  EXPECT_TRUE(same_entry(*s.get({0, 3}), *entry(3)));
}
