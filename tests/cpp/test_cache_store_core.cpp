// CacheStoreCore: LRU order, byte accounting, budgets, spill and reload, corruption on reload,
// reopening a spill directory, prefetch, and concurrent put/get/prefetch (run under TSan/ASan
// with -DSTACKWISE_SANITIZE=thread|address).
#include <gtest/gtest.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <thread>
#include <vector>

#include "cache_test_util.h"
#include "stackwise/cache_store_core.h"

using namespace stackwise::core;
using stackwise::core::testing::count_spill_files;
using stackwise::core::testing::make_entry;
using stackwise::core::testing::spill_file;
using stackwise::core::testing::same_entry;
using stackwise::core::testing::TempDir;
namespace fs = std::filesystem;

namespace {
// make_entry(8, 8, s): 8*8*4 value bytes + 8 mask bytes.
constexpr uint64_t kEntryBytes = 8 * 8 * 4 + 8;
std::shared_ptr<EntryData> entry(uint32_t seed) { return make_entry(8, 8, seed); }

// Writes entries (0, 0..n-1) to spill files in dir and closes the store, keeping them: a store
// reopened there holds everything on disk only.
void spill_entries(const std::string& dir, uint32_t n) {
  CacheStoreCore w({0, 0}, dir);
  for (uint32_t i = 0; i < n; ++i) w.put({0, i}, entry(i));
  w.close(/*keep_files=*/true);
}
}  // namespace

TEST(CacheStoreCore, ByteAccounting) {
  CacheStoreCore s({}, "");
  s.put({0, 0}, entry(0));
  s.put({0, 1}, entry(1));
  auto st = s.stats();
  EXPECT_EQ(st.bytes_in_memory, 2 * kEntryBytes);
  EXPECT_EQ(st.entries, 2u);
  EXPECT_EQ(st.entries_in_memory, 2u);
  s.put({0, 1}, make_entry(4, 8, 9));  // replacing adjusts, not adds
  EXPECT_EQ(s.stats().bytes_in_memory, kEntryBytes + 4 * 8 * 4 + 4);
  s.evict({0, 0});
  EXPECT_EQ(s.stats().bytes_in_memory, 4u * 8 * 4 + 4);
  EXPECT_FALSE(s.contains({0, 0}));
  EXPECT_THROW(s.evict({0, 0}), CacheKeyMissing);
  EXPECT_THROW(s.get({5, 5}), CacheKeyMissing);
  s.clear();
  EXPECT_EQ(s.stats().bytes_in_memory, 0u);
  EXPECT_EQ(s.stats().entries, 0u);
}

TEST(CacheStoreCore, BudgetWithoutSpillDirRaisesAndKeepsEverything) {
  CacheStoreCore s({2 * kEntryBytes, 0}, "");
  s.put({0, 0}, entry(0));
  s.put({0, 1}, entry(1));
  EXPECT_THROW(s.put({0, 2}, entry(2)), CacheBudgetExceeded);
  EXPECT_EQ(s.stats().entries, 2u);
  EXPECT_TRUE(same_entry(*s.get({0, 0}), *entry(0)));
  EXPECT_TRUE(same_entry(*s.get({0, 1}), *entry(1)));
  s.put({0, 1}, entry(7));  // replacing within budget is fine
  CacheStoreCore c({0, 1}, "");
  c.put({1, 1}, entry(1));
  EXPECT_THROW(c.put({1, 2}, entry(2)), CacheBudgetExceeded);
}

TEST(CacheStoreCore, LruOrderDecidesWhatSpills) {
  TempDir d;
  CacheStoreCore s({3 * kEntryBytes, 0}, d.path);
  for (uint32_t i = 0; i < 3; ++i) s.put({0, i}, entry(i));
  s.get({0, 0});                // 0 becomes most recent; 1 is now least recent
  s.put({0, 3}, entry(3));      // spills 1
  EXPECT_TRUE(!spill_file(d.path, {0, 1}).empty());
  EXPECT_FALSE(!spill_file(d.path, {0, 0}).empty());
  auto st = s.stats();
  EXPECT_EQ(st.spills, 1u);
  EXPECT_EQ(st.entries, 4u);
  EXPECT_EQ(st.entries_in_memory, 3u);
  EXPECT_EQ(st.entries_on_disk, 1u);
  EXPECT_EQ(st.bytes_in_memory, 3 * kEntryBytes);
  EXPECT_GT(st.bytes_on_disk, kEntryBytes);
  s.put({0, 4}, entry(4));      // next least recent is 2
  EXPECT_TRUE(!spill_file(d.path, {0, 2}).empty());
}

TEST(CacheStoreCore, EntryCountBudget) {
  TempDir d;
  CacheStoreCore s({0, 2}, d.path);
  for (uint32_t i = 0; i < 5; ++i) s.put({1, i}, entry(i));
  auto st = s.stats();
  EXPECT_EQ(st.entries_in_memory, 2u);
  EXPECT_EQ(st.entries_on_disk, 3u);
}

TEST(CacheStoreCore, SpillAndReloadAreIdentical) {
  TempDir d;
  CacheStoreCore s({kEntryBytes, 0}, d.path);
  for (uint32_t i = 0; i < 6; ++i) s.put({2, i}, entry(i));
  for (uint32_t i = 0; i < 6; ++i) EXPECT_TRUE(same_entry(*s.get({2, i}), *entry(i))) << i;
  auto st = s.stats();
  EXPECT_EQ(st.spills, 6u);  // five while putting, entry 5 when entry 0 was read back
  EXPECT_EQ(st.misses, 6u);
  // A reloaded entry keeps its clean file: dropping it again needs no second write.
  for (uint32_t i = 0; i < 6; ++i) s.get({2, i});
  EXPECT_EQ(s.stats().spills, 6u);
  EXPECT_LE(s.stats().bytes_in_memory, kEntryBytes);
}

TEST(CacheStoreCore, EntryLargerThanBudgetGoesToDisk) {
  TempDir d;
  CacheStoreCore s({16, 0}, d.path);
  s.put({0, 0}, entry(0));
  EXPECT_EQ(s.stats().entries_in_memory, 0u);
  EXPECT_TRUE(same_entry(*s.get({0, 0}), *entry(0)));
}

TEST(CacheStoreCore, CorruptSpillFileRaisesOnGetAndStays) {
  TempDir d;
  CacheStoreCore s({kEntryBytes, 0}, d.path);
  s.put({0, 0}, entry(0));
  s.put({0, 1}, entry(1));
  const std::string p = spill_file(d.path, {0, 0});
  {
    std::fstream f(p, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(-10, std::ios::end);
    f.put('\x7f');
  }
  try {
    s.get({0, 0});
    FAIL() << "no error";
  } catch (const CacheCorruption& e) {
    EXPECT_EQ(e.path(), p);
  }
  EXPECT_TRUE(s.contains({0, 0}));
  EXPECT_THROW(s.get({0, 0}), CacheCorruption);  // reported every time, never used
}

TEST(CacheStoreCore, ReopenIndexesSpillDirectory) {
  TempDir d;
  {
    CacheStoreCore s({2 * kEntryBytes, 0}, d.path);
    for (uint32_t i = 0; i < 5; ++i) s.put({3, i}, entry(i));
    s.close(/*keep_files=*/true);  // writes the in-memory ones too
  }
  // A writer that died before its rename leaves only a temporary file.
  { std::ofstream(d.path + "/.tmp-blk3_batch9.swspill.999999999.0") << "partial"; }
  { std::ofstream(d.path + "/README") << "not ours"; }
  CacheStoreCore r({0, 0}, d.path, /*reopen=*/true);
  EXPECT_EQ(r.stats().entries, 5u);
  EXPECT_EQ(r.stats().entries_in_memory, 0u);
  EXPECT_FALSE(r.contains({3, 9}));
  EXPECT_FALSE(fs::exists(d.path + "/.tmp-blk3_batch9.swspill.999999999.0"));
  for (uint32_t i = 0; i < 5; ++i) EXPECT_TRUE(same_entry(*r.get({3, i}), *entry(i)));
  r.close();  // reopened files are not this store's: they stay
  EXPECT_TRUE(!spill_file(d.path, {3, 0}).empty());
}

TEST(CacheStoreCore, ReopenRejectsForeignSpillFile) {
  TempDir d;
  const std::string p = d.path + "/blk0_batch0.00000000000000aa-1.swspill";
  { std::ofstream(p) << std::string(100, 'z'); }
  try {
    CacheStoreCore r({}, d.path, true);
    FAIL() << "no error";
  } catch (const CacheCorruption& e) {
    EXPECT_EQ(e.path(), p);
  }
}

TEST(CacheStoreCore, CloseRemovesOwnFiles) {
  TempDir d;
  CacheStoreCore s({kEntryBytes, 0}, d.path);
  for (uint32_t i = 0; i < 4; ++i) s.put({0, i}, entry(i));
  EXPECT_EQ(count_spill_files(d.path), 3);
  s.close();  // the spill files and the lock file go
  EXPECT_EQ(std::distance(fs::directory_iterator(d.path), fs::directory_iterator{}), 0);
  EXPECT_THROW(s.get({0, 0}), std::logic_error);
}

TEST(CacheStoreCore, PrefetchThenGetHitsMemory) {
  TempDir d;
  CacheStoreCore s({4 * kEntryBytes, 0}, d.path);
  for (uint32_t i = 0; i < 8; ++i) s.put({0, i}, entry(i));
  s.prefetch({{0, 0}, {0, 1}, {0, 2}, {7, 7}});
  s.wait_prefetch();
  for (uint32_t i = 0; i < 3; ++i) EXPECT_TRUE(same_entry(*s.get({0, i}), *entry(i)));
  auto st = s.stats();
  EXPECT_EQ(st.prefetch_hits, 3u);
  EXPECT_EQ(st.misses, 0u);
  EXPECT_EQ(st.prefetch_errors, 0u);
}

// A scan that reads entry i while i+1..i+depth are prefetched: the prefetched entries not read yet
// must outlive the one just read, or every get misses (plain LRU evicts the next batch).
TEST(CacheStoreCore, ScanWithPrefetchKeepsEntriesNotReadYet) {
  TempDir d;
  constexpr uint32_t kDepth = 4, kBatches = 12;
  spill_entries(d.path, kBatches);
  CacheStoreCore s({0, kDepth + 1}, d.path, /*reopen=*/true);  // everything on disk only
  for (uint32_t i = 0; i < kBatches; ++i) {
    std::vector<CacheKey> ahead;
    for (uint32_t j = i + 1; j < std::min(kBatches, i + 1 + kDepth); ++j) ahead.push_back({0, j});
    s.prefetch(ahead);
    if (i == 0) s.wait_prefetch();
    EXPECT_TRUE(same_entry(*s.get({0, i}), *entry(i)));
    s.wait_prefetch();
  }
  auto st = s.stats();
  EXPECT_EQ(st.misses, 1u);  // the first batch, asked for before any prefetch
  EXPECT_EQ(st.prefetch_hits, kBatches - 1);
  EXPECT_EQ(st.loads, kBatches);  // nothing read twice
  EXPECT_EQ(st.prefetch_late, 0u);  // every read ahead had finished before its get
  EXPECT_GT(st.read_ns, 0u);
  uint64_t file_bytes = 0;
  for (uint32_t i = 0; i < kBatches; ++i) file_bytes += fs::file_size(spill_file(d.path, {0, i}));
  EXPECT_EQ(st.bytes_read, file_bytes);  // each file read once, whole
}

// Read-ahead deeper than the budget allows: the keys that do not fit are skipped rather than
// evicting the earlier read-ahead (which the reader needs first).
TEST(CacheStoreCore, PrefetchDeeperThanBudgetSkipsInsteadOfEvicting) {
  TempDir d;
  spill_entries(d.path, 6);
  CacheStoreCore s({0, 2}, d.path, /*reopen=*/true);
  s.prefetch({{0, 1}, {0, 2}, {0, 3}, {0, 4}});
  s.wait_prefetch();
  auto st = s.stats();
  EXPECT_EQ(st.loads, 2u);
  EXPECT_EQ(st.prefetch_skipped, 2u);
  EXPECT_TRUE(same_entry(*s.get({0, 1}), *entry(1)));
  EXPECT_TRUE(same_entry(*s.get({0, 2}), *entry(2)));
  st = s.stats();
  EXPECT_EQ(st.prefetch_hits, 2u);
  EXPECT_EQ(st.misses, 0u);
  s.prefetch({{0, 3}});  // the earlier read-ahead has been read: room again
  s.wait_prefetch();
  EXPECT_TRUE(same_entry(*s.get({0, 3}), *entry(3)));
  EXPECT_EQ(s.stats().prefetch_hits, 3u);
}

// get with release hands over entries that have a file (the file stays the store's copy) and
// keeps entries that exist only in memory.
TEST(CacheStoreCore, ReleaseHandsOverOnlyEntriesWithFiles) {
  TempDir d;
  spill_entries(d.path, 3);
  CacheStoreCore s({0, 0}, d.path, /*reopen=*/true);
  EXPECT_TRUE(same_entry(*s.get({0, 0}, /*release=*/true), *entry(0)));  // read, not installed
  EXPECT_EQ(s.stats().entries_in_memory, 0u);
  s.get({0, 1});  // resident, with a clean file
  EXPECT_EQ(s.stats().entries_in_memory, 1u);
  auto held = s.get({0, 1}, /*release=*/true);
  EXPECT_EQ(held.use_count(), 1);  // the caller holds the only reference
  EXPECT_EQ(s.stats().entries_in_memory, 0u);
  EXPECT_TRUE(same_entry(*s.get({0, 0}), *entry(0)));  // the file is still there
  s.put({1, 0}, entry(9));  // memory only: release must not drop it
  EXPECT_TRUE(same_entry(*s.get({1, 0}, /*release=*/true), *entry(9)));
  EXPECT_TRUE(s.contains({1, 0}));
  auto st = s.stats();
  EXPECT_EQ(st.released, 2u);
  EXPECT_EQ(st.loads, 3u);
  EXPECT_EQ(st.entries_in_memory, 2u);  // {0, 0} from the last plain get, and {1, 0}
}

// A get racing its own read-ahead is counted exactly once: as a hit (read ahead in time), as
// late (it waited for the read in progress) or as a miss (it read the file before the prefetch
// thread reached it). Which one depends on timing; the sum does not.
TEST(CacheStoreCore, GetRacingPrefetchIsCountedOnce) {
  TempDir d;
  constexpr uint32_t kBatches = 16;
  spill_entries(d.path, kBatches);
  CacheStoreCore s({0, 0}, d.path, /*reopen=*/true);
  for (uint32_t i = 0; i < kBatches; ++i) {
    s.prefetch({{0, i}});
    EXPECT_TRUE(same_entry(*s.get({0, i}), *entry(i)));
  }
  s.wait_prefetch();
  auto st = s.stats();
  EXPECT_EQ(st.hits + st.misses + st.prefetch_late, kBatches);
  EXPECT_LE(st.prefetch_hits, st.hits);
  EXPECT_EQ(st.loads, kBatches);  // a file is read by one thread, never by both
  EXPECT_EQ(st.prefetch_errors, 0u);
}

TEST(CacheStoreCore, ConcurrentPutGetPrefetch) {
  TempDir d;
  CacheStoreCore s({6 * kEntryBytes, 0}, d.path);
  constexpr int kThreads = 4, kPerThread = 40;
  std::atomic<int> bad{0};
  std::vector<std::thread> ts;
  for (int t = 0; t < kThreads; ++t) {
    ts.emplace_back([&, t] {
      for (int i = 0; i < kPerThread; ++i) {
        const CacheKey k{t, i};
        s.put(k, entry(uint32_t(t * 1000 + i)));
        if (i >= 2) s.prefetch({{t, i - 2}, {(t + 1) % kThreads, i - 2}});
        if (!same_entry(*s.get(k), *entry(uint32_t(t * 1000 + i)))) ++bad;
        if (i >= 1 && !same_entry(*s.get({t, i - 1}), *entry(uint32_t(t * 1000 + i - 1)))) ++bad;
        if (i % 7 == 3) s.evict({t, i - 3});
        s.stats();
      }
    });
  }
  for (auto& th : ts) th.join();
  s.wait_prefetch();
  EXPECT_EQ(bad.load(), 0);
  auto st = s.stats();
  EXPECT_EQ(st.entries, uint64_t(kThreads) * (kPerThread - kPerThread / 7 -
                                              (kPerThread % 7 > 3 ? 1 : 0)));
  EXPECT_LE(st.entries_in_memory, 6u + kThreads);
  for (int t = 0; t < kThreads; ++t)
    for (int i = 0; i < kPerThread; ++i)
      if (s.contains({t, i}))
        EXPECT_TRUE(same_entry(*s.get({t, i}), *entry(uint32_t(t * 1000 + i))));
}
