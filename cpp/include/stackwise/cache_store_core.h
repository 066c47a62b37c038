// The activation-cache store's torch-free core: an index of entries keyed by (block, batch), an
// LRU order over the entries held in host memory, byte/entry budgets, spilling to disk, reading
// back (on demand or ahead of need on a background thread) and re-indexing a spill directory.
//
// Entry states: in memory only; in memory with a clean copy on disk (after a reload: dropping it
// again costs no write); on disk only. Over a budget the least recently used in-memory entries
// leave memory: written to the spill directory first unless a clean copy exists. With no spill
// directory a put that would exceed a budget throws CacheBudgetExceeded and changes nothing.
//
// Ownership: each store has a random 64-bit id, written into its spill files' names and headers
// (see spill_format.h), and holds an exclusive lock (flock) on its lock file
// `.swstore-<id>.lock` in the spill directory until close. Stores sharing a directory therefore
// never read, overwrite or delete each other's files; a reopening store adopts only the files of
// stores whose lock is free (closed or dead), renaming them to its own id.
//
// Thread safety: one mutex guards the index; file writes and reads run outside it, so a get of
// an in-memory entry never waits on the disk. Writes are serialised by a second mutex (one disk,
// and one file name per key: serialising makes a stale writer's rename impossible to interleave).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <list>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "stackwise/spill_format.h"

namespace stackwise::core {

struct StoreLimits {
  uint64_t max_memory_bytes = 0;  // 0: no limit
  uint64_t max_entries = 0;       // entries held in memory; 0: no limit
};

struct StoreStats {
  uint64_t bytes_in_memory = 0, bytes_pinned = 0, bytes_on_disk = 0;
  uint64_t entries = 0, entries_in_memory = 0, entries_on_disk = 0;
  uint64_t hits = 0, misses = 0, not_found = 0, spills = 0, loads = 0;
  // hits: gets that found the entry in memory; prefetch_hits: those of them read ahead by
  // prefetch; prefetch_late: gets that waited for a prefetch read still in progress (neither hits
  // nor misses); prefetch_skipped: read-aheads not done because the budgets were already full of
  // entries read ahead and not read yet (reading more would evict the ones needed first).
  // read_ns / bytes_read: time spent reading spill files (any thread) and bytes read.
  uint64_t prefetch_requests = 0, prefetch_hits = 0, prefetch_late = 0, prefetch_errors = 0;
  uint64_t prefetch_skipped = 0;
  uint64_t released = 0;  // gets with release that handed the entry over (its file stays)
  uint64_t write_errors = 0;  // spill writes that failed (disk full, permissions)
  uint64_t read_ns = 0, bytes_read = 0;
};

// put without a spill directory would exceed a budget.
class CacheBudgetExceeded : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// get/evict of a key the store does not hold.
class CacheKeyMissing : public std::out_of_range {
 public:
  using std::out_of_range::out_of_range;
};

class CacheStoreCore {
 public:
  // spill_dir empty: memory only. reopen: index the spill files already in spill_dir (they stay
  // on close unless evicted or cleared); otherwise the directory is created when missing.
  CacheStoreCore(StoreLimits limits, std::string spill_dir, bool reopen = false,
                 BlobAllocator alloc = nullptr, void* alloc_ctx = nullptr);
  ~CacheStoreCore();
  CacheStoreCore(const CacheStoreCore&) = delete;
  CacheStoreCore& operator=(const CacheStoreCore&) = delete;

  // Stores (or replaces) an entry; records are validated. Room is made first: LRU entries are
  // spilled (blocking on their writes) before the entry goes in, so if a spill write fails
  // (disk full) its CacheIOError propagates, the entries it was moving stay in memory and the
  // put has changed nothing (a replaced entry keeps its old value). An entry larger than
  // max_memory_bytes is written straight to disk. Without a spill directory a put over budget
  // throws CacheBudgetExceeded.
  void put(const CacheKey& key, std::shared_ptr<const EntryData> data);
  // The entry's data (shared, immutable). Reads it back from disk when spilled (a read that
  // cannot make room because spilling others fails, e.g. disk full, still returns the data and
  // leaves the entry on disk only). With release, an
  // entry that has a complete spill file is handed over: it leaves memory (or, read from disk
  // for this get, never enters it) and the file stays the store's copy, so the caller holds the
  // only reference and a later get reads the file again. Entries held only in memory stay.
  std::shared_ptr<const EntryData> get(const CacheKey& key, bool release = false);
  bool contains(const CacheKey& key) const;
  void evict(const CacheKey& key);  // removes the entry and its file; CacheKeyMissing if absent
  void clear();                     // removes every entry and every indexed spill file
  // Queues background reads of spilled entries; unknown or in-memory keys are skipped.
  void prefetch(const std::vector<CacheKey>& keys);
  void wait_prefetch();             // returns when the prefetch queue is drained
  void flush();                     // writes every in-memory entry lacking a file
  // Stops the prefetch thread; removes the spill files this store wrote unless keep_files
  // (then in-memory entries are written first so a reopen finds everything). Idempotent.
  void close(bool keep_files = false);

  StoreStats stats() const;
  std::vector<CacheKey> keys() const;  // sorted by (block, batch)
  const std::string& spill_dir() const { return spill_dir_; }
  uint64_t store_id() const { return store_id_; }
  bool closed() const;

 private:
  struct Entry {
    uint64_t gen = 0;
    std::shared_ptr<const EntryData> data;  // null: on disk only
    uint64_t bytes = 0;                     // payload bytes when in memory
    bool pinned = false;
    std::string path;                       // non-empty: a complete file holds this gen
    SpillOwner owner;                       // the owner recorded in that file
    uint64_t file_bytes = 0;
    bool owned_file = false, writing = false, loading = false, prefetched = false;
    std::list<CacheKey>::iterator lru;      // valid while data != null
  };
  struct Victim {
    CacheKey key;
    uint64_t gen;
    std::shared_ptr<const EntryData> data;
  };

  void check_open_locked() const;
  void drop_memory_locked(Entry& e);
  void install_memory_locked(const CacheKey& key, Entry& e,
                             std::shared_ptr<const EntryData> data);
  void remove_locked(const CacheKey& key, Entry& e);
  // Picks the entries that must leave memory for `add_bytes` / `add_entries` more (replacing
  // `replacing`'s in-memory copy, if any, which is never picked).
  std::vector<Victim> make_room_locked(uint64_t add_bytes = 0, uint64_t add_entries = 0,
                                       const CacheKey* replacing = nullptr);
  // Installs a new generation of `key` (in memory, or on disk only when `path` is set).
  void install_new_locked(const CacheKey& key, uint64_t gen, std::shared_ptr<const EntryData> data,
                          const std::pair<std::string, uint64_t>* file);
  void put_to_disk(const CacheKey& key, std::shared_ptr<const EntryData> data);
  void lock_directory();
  void unlock_directory();
  // Whether a read-ahead of `bytes` fits in the budgets beside the entries already read ahead
  // and not read yet (everything else can leave memory to make room).
  bool read_ahead_fits_locked(uint64_t bytes) const;
  void write_victims(std::vector<Victim> victims);
  // Makes the entry resident (reading its file if needed; see get for release); returns its data.
  std::shared_ptr<const EntryData> load(const CacheKey& key, bool for_prefetch, bool release);
  void prefetch_loop();
  void index_directory();

  const StoreLimits limits_;
  const std::string spill_dir_;
  uint64_t store_id_ = 0;
  int lock_fd_ = -1;
  std::string lock_path_;
  BlobAllocator alloc_;
  void* alloc_ctx_;

  mutable std::mutex mu_;
  std::condition_variable load_cv_;
  std::mutex io_mu_;
  std::unordered_map<CacheKey, Entry, CacheKeyHash> index_;
  std::list<CacheKey> lru_;  // front: most recently used
  uint64_t next_gen_ = 1;
  uint64_t mem_bytes_ = 0, pinned_bytes_ = 0, mem_entries_ = 0, disk_bytes_ = 0, disk_entries_ = 0;
  uint64_t releasing_bytes_ = 0, releasing_entries_ = 0;  // victims being written
  mutable StoreStats counters_;
  bool closed_ = false;

  std::condition_variable prefetch_cv_, prefetch_idle_cv_;
  std::deque<CacheKey> prefetch_queue_;
  bool prefetch_busy_ = false, stop_ = false;
  std::thread prefetch_thread_;
};

}  // namespace stackwise::core
