// CacheStoreCore: index, LRU, budgets, spill/reload, prefetch thread (see cache_store_core.h).
#include "stackwise/cache_store_core.h"

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstring>
#include <random>
#include <unordered_set>
#include <utility>

namespace stackwise::core {
namespace {

std::string key_text(const CacheKey& k) {
  return "(block " + std::to_string(k.block) + ", batch " + std::to_string(k.batch) + ")";
}

void make_dirs(const std::string& dir) {
  std::string cur;
  size_t pos = 0;
  while (pos != std::string::npos) {
    pos = dir.find('/', pos + 1);
    cur = dir.substr(0, pos);
    if (cur.empty()) continue;
    if (::mkdir(cur.c_str(), 0755) != 0 && errno != EEXIST)
      throw CacheIOError("cannot create spill directory " + cur + ": " + std::strerror(errno));
  }
  struct stat st;
  if (::stat(dir.c_str(), &st) != 0 || !S_ISDIR(st.st_mode))
    throw CacheIOError("spill directory " + dir + " is not a directory");
}

// A temporary file left by a writer that died: ".tmp-<name>.<pid>.<n>" whose pid is gone.
bool is_stale_temp(const std::string& name) {
  if (name.rfind(kSpillTempPrefix, 0) != 0) return false;
  const size_t last = name.rfind('.');
  if (last == std::string::npos || last == 0) return false;
  const size_t prev = name.rfind('.', last - 1);
  if (prev == std::string::npos) return false;
  const long pid = std::strtol(name.c_str() + prev + 1, nullptr, 10);
  if (pid <= 0) return true;
  return ::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH;
}

std::string lock_file_name(uint64_t store) { return ".swstore-" + hex_id(store) + ".lock"; }

uint64_t random_store_id() {
  std::random_device rd;
  uint64_t id = (uint64_t(rd()) << 32) ^ uint64_t(rd());
  id ^= uint64_t(std::chrono::steady_clock::now().time_since_epoch().count()) * 0x9E3779B97F4A7C15ull;
  id ^= uint64_t(::getpid()) << 40;
  return id ? id : 1;
}

}  // namespace

CacheStoreCore::CacheStoreCore(StoreLimits limits, std::string spill_dir, bool reopen,
                               BlobAllocator alloc, void* alloc_ctx)
    : limits_(limits), spill_dir_(std::move(spill_dir)), alloc_(alloc), alloc_ctx_(alloc_ctx) {
  if (reopen && spill_dir_.empty()) throw std::invalid_argument("reopen needs a spill directory");
  if (spill_dir_.empty()) return;
  make_dirs(spill_dir_);
  lock_directory();
  try {
    if (reopen) index_directory();
  } catch (...) {
    unlock_directory();
    throw;
  }
}

CacheStoreCore::~CacheStoreCore() {
  {
    std::lock_guard<std::mutex> g(mu_);
    stop_ = true;
  }
  prefetch_cv_.notify_all();
  if (prefetch_thread_.joinable()) prefetch_thread_.join();
  unlock_directory();  // files not removed by close() stay for a reopening store to adopt
}

void CacheStoreCore::lock_directory() {
  for (int attempt = 0; attempt < 16; ++attempt) {
    store_id_ = random_store_id();
    lock_path_ = spill_dir_ + "/" + lock_file_name(store_id_);
    const int fd = ::open(lock_path_.c_str(), O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
    if (fd < 0) {
      if (errno == EEXIST) continue;  // another store drew the same id
      throw CacheIOError("cannot create lock file " + lock_path_ + ": " + std::strerror(errno));
    }
    if (::flock(fd, LOCK_EX | LOCK_NB) != 0) {
      const int err = errno;
      ::unlink(lock_path_.c_str());
      ::close(fd);
      throw CacheIOError("cannot lock " + lock_path_ + ": " + std::strerror(err));
    }
    const std::string pid = std::to_string(::getpid()) + "\n";
    if (::write(fd, pid.data(), pid.size()) < 0) {  // informative only
    }
    lock_fd_ = fd;
    return;
  }
  throw CacheIOError("cannot create a lock file of its own in " + spill_dir_);
}

void CacheStoreCore::unlock_directory() {
  if (lock_fd_ < 0) return;
  ::unlink(lock_path_.c_str());  // while still holding the lock
  ::close(lock_fd_);
  lock_fd_ = -1;
}

void CacheStoreCore::index_directory() {
  DIR* d = ::opendir(spill_dir_.c_str());
  if (!d) throw CacheIOError("cannot list " + spill_dir_ + ": " + std::strerror(errno));
  std::vector<std::string> names;
  while (dirent* ent = ::readdir(d)) names.emplace_back(ent->d_name);
  ::closedir(d);
  std::sort(names.begin(), names.end());

  // Stores whose files may be adopted: their lock file is gone or not locked (closed or dead
  // stores). The value is the locked file descriptor held while adopting (-1: no lock file).
  std::unordered_map<uint64_t, int> claimed;
  std::unordered_set<uint64_t> live;
  auto claim = [&](uint64_t store) {
    if (claimed.count(store)) return true;
    if (live.count(store) || store == store_id_) return false;
    const std::string lp = spill_dir_ + "/" + lock_file_name(store);
    const int fd = ::open(lp.c_str(), O_RDWR | O_CLOEXEC);
    if (fd >= 0 && ::flock(fd, LOCK_EX | LOCK_NB) != 0) {  // a live store: not ours to take
      ::close(fd);
      live.insert(store);
      return false;
    }
    claimed[store] = fd;
    return true;
  };
  auto release_claims = [&] {
    for (auto& [store, fd] : claimed) {
      if (fd < 0) continue;
      ::unlink((spill_dir_ + "/" + lock_file_name(store)).c_str());
      ::close(fd);
    }
  };
  struct Found {
    CacheKey key;
    SpillOwner named;
    std::string path;
    SpillHeader header;
  };
  std::vector<Found> found;
  std::unordered_map<CacheKey, size_t, CacheKeyHash> slot;
  try {
    for (const auto& name : names) {
      const std::string path = spill_dir_ + "/" + name;
      if (is_stale_temp(name)) {  // never renamed: the write did not complete
        ::unlink(path.c_str());
        continue;
      }
      CacheKey key;
      SpillOwner named;
      if (!parse_spill_file_name(name, &key, &named)) continue;  // not a spill file
      if (!claim(named.store)) continue;                         // a live store's file
      SpillHeader h = read_spill_header(path);
      if (!(h.key == key))
        throw CacheCorruption(path, "holds " + key_text(h.key) + ", not the entry it is named for");
      auto it = slot.find(key);
      if (it == slot.end()) {
        slot.emplace(key, found.size());
        found.push_back({key, named, path, std::move(h)});
        continue;
      }
      Found& prev = found[it->second];
      if (prev.named.store != named.store)
        throw CacheCorruption(path, "a second spill file for " + key_text(key) + " beside " +
                                        prev.path + ", from another store; remove one of them");
      // Two generations of one store's entry (the process died between writing the new one
      // and removing the old): the newer one is the entry.
      if (named.gen > prev.named.gen) {
        ::unlink(prev.path.c_str());
        prev = {key, named, path, std::move(h)};
      } else {
        ::unlink(path.c_str());
      }
    }
    // Adopt: each file is renamed to this store's name, so that it is covered by this store's
    // lock from now on; the header keeps the writer, which reads check against.
    for (const Found& f : found) {
      Entry e;
      e.gen = next_gen_++;
      const std::string own = spill_dir_ + "/" + spill_file_name(f.key, {store_id_, e.gen});
      if (::rename(f.path.c_str(), own.c_str()) != 0)
        throw CacheIOError("cannot rename " + f.path + " to " + own + ": " + std::strerror(errno));
      e.bytes = f.header.payload_bytes;
      e.path = own;
      e.owner = f.header.owner;
      e.file_bytes = f.header.header_bytes + f.header.payload_bytes;
      disk_bytes_ += e.file_bytes;
      ++disk_entries_;
      index_.emplace(f.key, std::move(e));
    }
  } catch (...) {
    release_claims();
    throw;
  }
  release_claims();
}

void CacheStoreCore::check_open_locked() const {
  if (closed_) throw std::logic_error("the activation cache store is closed");
}

void CacheStoreCore::drop_memory_locked(Entry& e) {
  if (!e.data) return;
  mem_bytes_ -= e.bytes;
  if (e.pinned) pinned_bytes_ -= e.bytes;
  --mem_entries_;
  lru_.erase(e.lru);
  e.data.reset();
  e.prefetched = false;
}

void CacheStoreCore::install_memory_locked(const CacheKey& key, Entry& e,
                                           std::shared_ptr<const EntryData> data) {
  e.bytes = data->payload_bytes();
  e.pinned = data->pinned();
  e.data = std::move(data);
  mem_bytes_ += e.bytes;
  if (e.pinned) pinned_bytes_ += e.bytes;
  ++mem_entries_;
  lru_.push_front(key);
  e.lru = lru_.begin();
}

void CacheStoreCore::remove_locked(const CacheKey& key, Entry& e) {
  drop_memory_locked(e);
  if (!e.path.empty()) {
    ::unlink(e.path.c_str());
    disk_bytes_ -= e.file_bytes;
    --disk_entries_;
  }
  if (e.writing) {  // the writer finds the entry gone and removes what it wrote
    releasing_bytes_ -= e.bytes;
    --releasing_entries_;
  }
  index_.erase(key);
}

bool CacheStoreCore::read_ahead_fits_locked(uint64_t bytes) const {
  uint64_t n = 1, b = bytes;
  for (const auto& k : lru_) {
    const Entry& e = index_.at(k);
    if (e.prefetched) ++n, b += e.bytes;
  }
  return !(limits_.max_entries && n > limits_.max_entries) &&
         !(limits_.max_memory_bytes && b > limits_.max_memory_bytes);
}

std::vector<CacheStoreCore::Victim> CacheStoreCore::make_room_locked(uint64_t add_bytes,
                                                                     uint64_t add_entries,
                                                                     const CacheKey* replacing) {
  std::vector<Victim> victims;
  // The in-memory copy a put replaces leaves memory with it (unless it is being written, when
  // it is already counted as leaving).
  uint64_t freed_bytes = 0, freed_entries = 0;
  if (replacing) {
    auto it = index_.find(*replacing);
    if (it != index_.end() && it->second.data && !it->second.writing)
      freed_bytes = it->second.bytes, freed_entries = 1;
  }
  auto over = [&] {
    const uint64_t b = mem_bytes_ - releasing_bytes_ - freed_bytes + add_bytes;
    const uint64_t n = mem_entries_ - releasing_entries_ - freed_entries + add_entries;
    return (limits_.max_memory_bytes && b > limits_.max_memory_bytes) ||
           (limits_.max_entries && n > limits_.max_entries);
  };
  // Least recently used first, but entries read ahead by prefetch and not read yet go last: in
  // a scan (get i while i+1.. are prefetched) the entry just read is the most recent one, and
  // plain LRU would push out the prefetched batch needed next.
  for (int pass = 0; pass < 2 && over(); ++pass) {
    auto it = lru_.end();
    while (over() && it != lru_.begin()) {
      --it;
      if (replacing && *it == *replacing) continue;
      Entry& e = index_.at(*it);
      if (e.writing || e.loading || (pass == 0 && e.prefetched)) continue;
      if (!e.path.empty()) {  // a clean copy is on disk: just forget the memory
        auto next = std::next(it);
        drop_memory_locked(e);
        it = next;
        continue;
      }
      e.writing = true;
      releasing_bytes_ += e.bytes;
      ++releasing_entries_;
      victims.push_back({*it, e.gen, e.data});
    }
  }
  return victims;
}

void CacheStoreCore::write_victims(std::vector<Victim> victims) {
  std::exception_ptr first_error;
  std::lock_guard<std::mutex> io(io_mu_);
  for (auto& v : victims) {
    {
      std::lock_guard<std::mutex> g(mu_);
      auto it = index_.find(v.key);
      if (it == index_.end() || it->second.gen != v.gen) continue;  // evicted or replaced
    }
    const SpillOwner owner{store_id_, v.gen};
    std::pair<std::string, uint64_t> written;
    std::exception_ptr err;
    try {
      written = write_spill_file(spill_dir_, v.key, *v.data, owner);
    } catch (...) {
      err = std::current_exception();
    }
    std::lock_guard<std::mutex> g(mu_);
    if (err) ++counters_.write_errors;
    auto it = index_.find(v.key);
    if (it == index_.end() || it->second.gen != v.gen) {  // evicted or replaced meanwhile
      if (!err) ::unlink(written.first.c_str());
      continue;
    }
    Entry& e = it->second;
    e.writing = false;
    releasing_bytes_ -= e.bytes;
    --releasing_entries_;
    if (err) {  // stays in memory; the caller hears why
      if (!first_error) first_error = err;
      continue;
    }
    e.path = written.first;
    e.owner = owner;
    e.file_bytes = written.second;
    e.owned_file = true;
    disk_bytes_ += e.file_bytes;
    ++disk_entries_;
    ++counters_.spills;
    drop_memory_locked(e);
  }
  if (first_error) std::rethrow_exception(first_error);
}

void CacheStoreCore::install_new_locked(const CacheKey& key, uint64_t gen,
                                        std::shared_ptr<const EntryData> data,
                                        const std::pair<std::string, uint64_t>* file) {
  auto it = index_.find(key);
  if (it != index_.end()) remove_locked(key, it->second);
  Entry fresh;
  fresh.gen = gen;
  Entry& e = index_.emplace(key, std::move(fresh)).first->second;
  if (file) {  // on disk only
    e.bytes = data->payload_bytes();
    e.path = file->first;
    e.owner = {store_id_, gen};
    e.file_bytes = file->second;
    e.owned_file = true;
    disk_bytes_ += e.file_bytes;
    ++disk_entries_;
    ++counters_.spills;
  } else {
    install_memory_locked(key, e, std::move(data));
  }
  load_cv_.notify_all();  // a get waiting on the replaced generation looks again
}

void CacheStoreCore::put_to_disk(const CacheKey& key, std::shared_ptr<const EntryData> data) {
  uint64_t gen = 0;
  {
    std::lock_guard<std::mutex> g(mu_);
    check_open_locked();
    gen = next_gen_++;
  }
  std::pair<std::string, uint64_t> written;
  {
    std::lock_guard<std::mutex> io(io_mu_);
    try {
      written = write_spill_file(spill_dir_, key, *data, {store_id_, gen});
    } catch (...) {
      std::lock_guard<std::mutex> g(mu_);
      ++counters_.write_errors;
      throw;  // nothing was stored
    }
  }
  std::lock_guard<std::mutex> g(mu_);
  if (closed_) ::unlink(written.first.c_str());
  check_open_locked();
  install_new_locked(key, gen, std::move(data), &written);
}

void CacheStoreCore::put(const CacheKey& key, std::shared_ptr<const EntryData> data) {
  if (!data) throw std::invalid_argument("put: no entry data");
  for (const auto& r : data->records) validate_record(r);
  const uint64_t bytes = data->payload_bytes();
  if (!spill_dir_.empty() && limits_.max_memory_bytes && bytes > limits_.max_memory_bytes)
    return put_to_disk(key, std::move(data));
  // Room first, then the entry: a failed spill write leaves the store as it was.
  for (;;) {
    std::vector<Victim> victims;
    {
      std::lock_guard<std::mutex> g(mu_);
      check_open_locked();
      if (spill_dir_.empty()) {
        auto it = index_.find(key);
        const uint64_t old = (it != index_.end() && it->second.data) ? it->second.bytes : 0;
        const uint64_t old_n = (it != index_.end() && it->second.data) ? 1 : 0;
        if (limits_.max_memory_bytes && mem_bytes_ - old + bytes > limits_.max_memory_bytes)
          throw CacheBudgetExceeded(
              "put " + key_text(key) + ": " + std::to_string(bytes) +
              " more bytes would exceed max_memory_bytes=" +
              std::to_string(limits_.max_memory_bytes) + " (" + std::to_string(mem_bytes_) +
              " in use) and there is no spill directory; give the store a spill_dir, raise " +
              "the budget, or evict entries");
        if (limits_.max_entries && mem_entries_ - old_n + 1 > limits_.max_entries)
          throw CacheBudgetExceeded("put " + key_text(key) + ": the store holds max_entries=" +
                                    std::to_string(limits_.max_entries) +
                                    " entries and has no spill directory; give the store a " +
                                    "spill_dir, raise the limit, or evict entries");
      } else {
        victims = make_room_locked(bytes, 1, &key);
      }
      if (victims.empty()) {
        install_new_locked(key, next_gen_++, std::move(data), nullptr);
        return;
      }
    }
    write_victims(std::move(victims));  // throws on a failed write: nothing was stored
  }
}

std::shared_ptr<const EntryData> CacheStoreCore::load(const CacheKey& key, bool for_prefetch,
                                                      bool release) {
  std::unique_lock<std::mutex> lk(mu_);
  bool waited = false;  // this get waited for a read another thread had started
  for (;;) {
    check_open_locked();
    auto it = index_.find(key);
    if (it == index_.end()) {
      if (for_prefetch) return nullptr;
      ++counters_.not_found;
      throw CacheKeyMissing("no cached entry for " + key_text(key));
    }
    Entry& e = it->second;
    if (e.data) {
      if (for_prefetch) return e.data;
      if (waited && e.prefetched) {
        ++counters_.prefetch_late;
      } else {
        ++counters_.hits;
        if (e.prefetched) ++counters_.prefetch_hits;
      }
      e.prefetched = false;
      std::shared_ptr<const EntryData> out = e.data;
      if (release && !e.path.empty() && !e.writing) {
        drop_memory_locked(e);  // handed over: its file is the store's copy
        ++counters_.released;
      } else {
        lru_.splice(lru_.begin(), lru_, e.lru);  // most recently used
      }
      return out;
    }
    if (e.loading) {  // another thread is reading this file: wait for it, then look again
      waited = !for_prefetch;
      load_cv_.wait(lk);
      continue;
    }
    if (for_prefetch && !read_ahead_fits_locked(e.file_bytes)) {
      ++counters_.prefetch_skipped;  // it would push out a batch read ahead and not read yet
      return nullptr;
    }
    e.loading = true;
    const std::string path = e.path;
    const SpillOwner owner = e.owner;
    const uint64_t gen = e.gen;
    lk.unlock();
    std::shared_ptr<EntryData> data;
    std::exception_ptr err;
    const auto t0 = std::chrono::steady_clock::now();
    try {
      data = std::make_shared<EntryData>(read_spill_file(path, &key, alloc_, alloc_ctx_, &owner));
    } catch (...) {
      err = std::current_exception();
    }
    const auto read_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
        std::chrono::steady_clock::now() - t0);
    lk.lock();
    counters_.read_ns += static_cast<uint64_t>(read_ns.count());
    auto again = index_.find(key);
    const bool same = again != index_.end() && again->second.gen == gen;
    if (same) again->second.loading = false;
    load_cv_.notify_all();
    if (!same) continue;  // evicted or replaced while reading: look again
    if (err) std::rethrow_exception(err);
    Entry& cur = again->second;
    ++counters_.loads;
    counters_.bytes_read += cur.file_bytes;
    if (!for_prefetch) ++counters_.misses;
    if (release) {  // read for a caller that takes it: nothing else has to leave memory
      ++counters_.released;
      return data;
    }
    install_memory_locked(key, cur, data);
    if (for_prefetch) cur.prefetched = true;
    std::vector<Victim> victims = make_room_locked();
    lk.unlock();
    if (victims.empty()) return data;
    try {
      write_victims(std::move(victims));
    } catch (const CacheIOError&) {
      // No room could be made (disk full): the entry just read has a clean file, so it leaves
      // memory again instead; the read itself has succeeded.
      lk.lock();
      auto now = index_.find(key);
      if (now != index_.end() && now->second.gen == gen && now->second.data &&
          !now->second.path.empty())
        drop_memory_locked(now->second);
    }
    return data;
  }
}

std::shared_ptr<const EntryData> CacheStoreCore::get(const CacheKey& key, bool release) {
  return load(key, false, release);
}

bool CacheStoreCore::contains(const CacheKey& key) const {
  std::lock_guard<std::mutex> g(mu_);
  return index_.count(key) != 0;
}

void CacheStoreCore::evict(const CacheKey& key) {
  std::lock_guard<std::mutex> g(mu_);
  check_open_locked();
  auto it = index_.find(key);
  if (it == index_.end()) throw CacheKeyMissing("no cached entry for " + key_text(key));
  remove_locked(key, it->second);
  load_cv_.notify_all();
}

void CacheStoreCore::clear() {
  std::lock_guard<std::mutex> g(mu_);
  check_open_locked();
  prefetch_queue_.clear();
  std::vector<CacheKey> all;
  for (auto& [k, e] : index_) all.push_back(k);
  for (auto& k : all) remove_locked(k, index_.at(k));
  load_cv_.notify_all();
}

void CacheStoreCore::prefetch(const std::vector<CacheKey>& keys) {
  std::lock_guard<std::mutex> g(mu_);
  check_open_locked();
  for (const auto& k : keys) {
    auto it = index_.find(k);
    if (it == index_.end() || it->second.data || it->second.loading) continue;
    if (std::find(prefetch_queue_.begin(), prefetch_queue_.end(), k) != prefetch_queue_.end())
      continue;  // already queued
    prefetch_queue_.push_back(k);
    ++counters_.prefetch_requests;
  }
  if (!prefetch_thread_.joinable()) prefetch_thread_ = std::thread([this] { prefetch_loop(); });
  prefetch_cv_.notify_one();
}

void CacheStoreCore::prefetch_loop() {
  std::unique_lock<std::mutex> lk(mu_);
  for (;;) {
    prefetch_cv_.wait(lk, [&] { return stop_ || !prefetch_queue_.empty(); });
    if (stop_) break;
    const CacheKey key = prefetch_queue_.front();
    prefetch_queue_.pop_front();
    prefetch_busy_ = true;
    lk.unlock();
    try {
      load(key, true, false);
    } catch (...) {  // the get that needs it reads it again and reports the error
      std::lock_guard<std::mutex> g(mu_);
      ++counters_.prefetch_errors;
    }
    lk.lock();
    prefetch_busy_ = false;
    if (prefetch_queue_.empty()) prefetch_idle_cv_.notify_all();
  }
  prefetch_busy_ = false;
  prefetch_idle_cv_.notify_all();
}

void CacheStoreCore::wait_prefetch() {
  std::unique_lock<std::mutex> lk(mu_);
  prefetch_idle_cv_.wait(lk, [&] { return stop_ || (prefetch_queue_.empty() && !prefetch_busy_); });
}

void CacheStoreCore::flush() {
  if (spill_dir_.empty()) throw std::logic_error("flush: the store has no spill directory");
  std::vector<Victim> victims;
  {
    std::lock_guard<std::mutex> g(mu_);
    check_open_locked();
    for (auto& [k, e] : index_) {
      if (!e.data || !e.path.empty() || e.writing) continue;
      e.writing = true;
      releasing_bytes_ += e.bytes;
      ++releasing_entries_;
      victims.push_back({k, e.gen, e.data});
    }
  }
  write_victims(std::move(victims));
}

void CacheStoreCore::close(bool keep_files) {
  {
    std::lock_guard<std::mutex> g(mu_);
    if (closed_) return;
    stop_ = true;
    prefetch_queue_.clear();
  }
  prefetch_cv_.notify_all();
  if (prefetch_thread_.joinable()) prefetch_thread_.join();
  if (keep_files && !spill_dir_.empty()) flush();
  std::lock_guard<std::mutex> io(io_mu_);
  std::lock_guard<std::mutex> g(mu_);
  for (auto& [k, e] : index_) {
    if (!keep_files && e.owned_file && !e.path.empty()) ::unlink(e.path.c_str());
    e.data.reset();
  }
  index_.clear();
  lru_.clear();
  mem_bytes_ = pinned_bytes_ = mem_entries_ = disk_bytes_ = disk_entries_ = 0;
  closed_ = true;
  unlock_directory();
  load_cv_.notify_all();
}

bool CacheStoreCore::closed() const {
  std::lock_guard<std::mutex> g(mu_);
  return closed_;
}

StoreStats CacheStoreCore::stats() const {
  std::lock_guard<std::mutex> g(mu_);
  StoreStats s = counters_;
  s.bytes_in_memory = mem_bytes_;
  s.bytes_pinned = pinned_bytes_;
  s.bytes_on_disk = disk_bytes_;
  s.entries = index_.size();
  s.entries_in_memory = mem_entries_;
  s.entries_on_disk = disk_entries_;
  return s;
}

std::vector<CacheKey> CacheStoreCore::keys() const {
  std::vector<CacheKey> out;
  {
    std::lock_guard<std::mutex> g(mu_);
    for (const auto& [k, e] : index_) out.push_back(k);
  }
  std::sort(out.begin(), out.end(), [](const CacheKey& a, const CacheKey& b) {
    return a.block != b.block ? a.block < b.block : a.batch < b.batch;
  });
  return out;
}

}  // namespace stackwise::core
