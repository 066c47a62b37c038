// stackwise._C.ActivationCacheStore: the Python face of the activation-cache store.
// The index, budgets, spill files and prefetch thread are the torch-free CacheStoreCore
// (cpp/core/cache_store_core.cpp); tensors are converted by cache_codec.cpp. This file holds the
// pinned-memory budget, the compression-error statistics and the Python conversions, and maps
// the core's errors to Python: CacheCorruption -> stackwise.exceptions.CacheCorruptionError
// (naming the file), CacheKeyMissing -> KeyError, CacheBudgetExceeded -> CacheBudgetError,
// CacheIOError -> OSError. Heavy work runs with the GIL released.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/python.h>

#include <atomic>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#if defined(STACKWISE_WITH_CUDA)
#include <ATen/cuda/PinnedMemoryAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

#include "cache_codec.h"
#include "stackwise/cache_store_core.h"

namespace py = pybind11;

namespace stackwise::cache {
namespace {

constexpr const char* kValueRecord = "value";

// Host memory for payloads and for the tensors get() returns. Page-locked (device copies are
// then asynchronous) while the pinned budget lasts. Ordinary buffers are recycled: a freed
// buffer is kept (up to kPoolCapBytes) for the next request of the same size, because a fresh
// 64 MiB malloc is an mmap whose first touch page-faults: measured 16 ms to fill fresh memory
// against 5 ms to refill a reused buffer, which made put+get 2-3x slower than a plain copy_.
struct HostPool : std::enable_shared_from_this<HostPool> {
  static constexpr uint64_t kPoolCapBytes = uint64_t(512) << 20;
  uint64_t pinned_budget = 0;
  std::atomic<uint64_t> pinned_used{0};
  std::mutex mu;
  std::multimap<size_t, uint8_t*> free_buffers;
  uint64_t free_bytes = 0;

  ~HostPool() {
    for (auto& [n, p] : free_buffers) std::free(p);
  }

  static core::Blob allocate(size_t n, void* ctx) {
    return static_cast<HostPool*>(ctx)->get(n);
  }

  core::Blob get(size_t n) {
    core::Blob b;
    b.size = n;
#if defined(STACKWISE_WITH_CUDA)
    if (pinned_budget && pinned_used.load() + n <= pinned_budget &&
        c10::cuda::device_count() > 0) {
      auto holder = std::make_shared<c10::DataPtr>(
          at::cuda::getPinnedMemoryAllocator()->allocate(n ? n : 1));
      pinned_used += n;
      b.data = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(holder->get()),
                                        [holder, self = shared_from_this(), n](uint8_t*) mutable {
                                          self->pinned_used -= n;
                                          holder.reset();
                                        });
      b.pinned = true;
      return b;
    }
#endif
    uint8_t* p = nullptr;
    {
      std::lock_guard<std::mutex> g(mu);
      auto it = free_buffers.find(n);
      if (it != free_buffers.end()) {
        p = it->second;
        free_buffers.erase(it);
        free_bytes -= n;
      }
    }
    if (!p) {
      void* q = nullptr;
      if (::posix_memalign(&q, 64, n ? n : 1) != 0) throw std::bad_alloc();
      p = static_cast<uint8_t*>(q);
    }
    b.data = std::shared_ptr<uint8_t>(p, [self = shared_from_this(), n](uint8_t* q) {
      self->release(q, n);
    });
    return b;
  }

  void release(uint8_t* p, size_t n) {
    {
      std::lock_guard<std::mutex> g(mu);
      if (n >= 4096 && free_bytes + n <= kPoolCapBytes) {
        free_buffers.emplace(n, p);
        free_bytes += n;
        return;
      }
    }
    std::free(p);
  }

  uint64_t pooled_bytes() {
    std::lock_guard<std::mutex> g(mu);
    return free_bytes;
  }
};

std::string path_string(const py::object& p) {
  return py::str(py::module_::import("os").attr("fspath")(p)).cast<std::string>();
}

uint64_t non_negative(int64_t v, const char* name) {
  if (v < 0) throw py::value_error(std::string(name) + " must be >= 0, got " + std::to_string(v));
  return uint64_t(v);
}

// A CPU tensor over an as-is record's payload, keeping the entry alive while it lives. Only for
// an entry nothing else references (handed over by get with release), so no one else can see
// the tensor's writes.
at::Tensor adopt(const core::TensorRecord& r, std::shared_ptr<const core::EntryData> keep) {
  void* ptr = const_cast<uint8_t*>(r.payload.data.get());
  return at::from_blob(
      ptr, r.shape, [keep = std::move(keep)](void*) mutable { keep.reset(); },
      at::TensorOptions().dtype(scalar_type(r.dtype)));
}

class ActivationCacheStore {
 public:
  ActivationCacheStore(int64_t max_memory_bytes, int64_t max_entries,
                       const std::string& storage_precision, const py::object& spill_dir,
                       int64_t pinned_bytes, bool track_error, bool reopen = false)
      : storage_(parse_storage(storage_precision)),
        storage_name_(storage_precision),
        track_error_(track_error),
        pool_(std::make_shared<HostPool>()) {
    pool_->pinned_budget = non_negative(pinned_bytes, "pinned_bytes");
    core::StoreLimits limits{non_negative(max_memory_bytes, "max_memory_bytes"),
                             non_negative(max_entries, "max_entries")};
    std::string dir = spill_dir.is_none() ? std::string() : path_string(spill_dir);
    py::gil_scoped_release nogil;
    core_ = std::make_unique<core::CacheStoreCore>(limits, dir, reopen, &HostPool::allocate,
                                                   pool_.get());
  }

  // A store dropped without close() removes the spill files it wrote, as close() does: keeping
  // them is asked for with close(keep_files=True). A killed process leaves them for open().
  ~ActivationCacheStore() {
    py::gil_scoped_release nogil;  // the prefetch thread may be finishing a read
    try {
      core_->close(false);
    } catch (...) {  // nothing may escape a destructor; the files stay for a later open()
    }
    core_.reset();
  }

  void put(int64_t block, int64_t batch, const at::Tensor& tensor,
           const std::map<std::string, at::Tensor>& companions,
           const std::map<std::string, std::string>& meta) {
    auto data = std::make_shared<core::EntryData>();
    data->meta.assign(meta.begin(), meta.end());
    ErrorStats err;
    {
      py::gil_scoped_release nogil;
      data->records.push_back(encode(kValueRecord, tensor, storage_, &HostPool::allocate,
                                     pool_.get(), track_error_ ? &err : nullptr));
      // Companions (masks, token ids) are kept exactly.
      for (const auto& [name, t] : companions)
        data->records.push_back(encode(name, t, core::Storage::kAsIs, &HostPool::allocate,
                                       pool_.get(), nullptr));
      core_->put({block, batch}, std::move(data));
    }
    if (err.count) {
      std::lock_guard<std::mutex> g(err_mu_);
      error_.merge(err);
    }
  }

  py::tuple get(int64_t block, int64_t batch, const py::object& device, bool release) {
    const at::Device dev = device.is_none() ? at::Device(at::kCPU)
                                            : at::Device(py::str(device).cast<std::string>());
    at::Tensor value;
    std::map<std::string, at::Tensor> companions;
    std::shared_ptr<const core::EntryData> data;
    {
      py::gil_scoped_release nogil;
      data = core_->get({block, batch}, release);
      // Handed over and held by nobody else (the store dropped its reference and can never hand
      // it out again): as-is CPU records become tensors over the payload itself, no copy.
      const bool own = release && data.use_count() == 1;
      auto out = [&](const core::TensorRecord& r) {
        if (own && dev.is_cpu() && r.storage == core::Storage::kAsIs) return adopt(r, data);
        return decode(r, dev, &HostPool::allocate, pool_.get());
      };
      value = out(data->records.at(0));
      for (size_t i = 1; i < data->records.size(); ++i)
        companions[data->records[i].name] = out(data->records[i]);
    }
    py::dict meta;
    for (const auto& [k, v] : data->meta) meta[py::str(k)] = py::str(v);
    return py::make_tuple(value, companions, meta);
  }

  bool contains(int64_t block, int64_t batch) const { return core_->contains({block, batch}); }
  void evict(int64_t block, int64_t batch) { core_->evict({block, batch}); }
  void clear() {
    py::gil_scoped_release nogil;
    core_->clear();
  }
  void prefetch(const std::vector<std::pair<int64_t, int64_t>>& keys) {
    std::vector<core::CacheKey> ks;
    for (const auto& [b, n] : keys) ks.push_back({b, n});
    core_->prefetch(ks);
  }
  void wait_prefetch() {
    py::gil_scoped_release nogil;
    core_->wait_prefetch();
  }
  void flush() {
    py::gil_scoped_release nogil;
    core_->flush();
  }
  void close(bool keep_files) {
    py::gil_scoped_release nogil;
    core_->close(keep_files);
  }
  std::vector<std::pair<int64_t, int64_t>> keys() const {
    std::vector<std::pair<int64_t, int64_t>> out;
    for (const auto& k : core_->keys()) out.emplace_back(k.block, k.batch);
    return out;
  }

  py::dict stats() const {
    const core::StoreStats s = core_->stats();
    py::dict d;
    d["bytes_in_memory"] = s.bytes_in_memory;
    d["bytes_pinned"] = s.bytes_pinned;
    d["bytes_on_disk"] = s.bytes_on_disk;
    d["entries"] = s.entries;
    d["entries_in_memory"] = s.entries_in_memory;
    d["entries_on_disk"] = s.entries_on_disk;
    d["hits"] = s.hits;
    d["misses"] = s.misses;
    d["not_found"] = s.not_found;
    d["spills"] = s.spills;
    d["loads"] = s.loads;
    d["prefetch_requests"] = s.prefetch_requests;
    d["prefetch_hits"] = s.prefetch_hits;
    d["prefetch_late"] = s.prefetch_late;
    d["prefetch_skipped"] = s.prefetch_skipped;
    d["released"] = s.released;
    d["write_errors"] = s.write_errors;
    d["prefetch_errors"] = s.prefetch_errors;
    d["read_seconds"] = static_cast<double>(s.read_ns) * 1e-9;
    d["bytes_read"] = s.bytes_read;
    d["bytes_pooled"] = pool_->pooled_bytes();
    d["storage_precision"] = storage_name_;
    std::lock_guard<std::mutex> g(err_mu_);
    d["compression_max_abs_error"] = error_.max_abs;
    d["compression_rms_error"] =
        error_.count ? std::sqrt(error_.sum_sq / double(error_.count)) : 0.0;
    d["compression_elements"] = error_.count;
    return d;
  }

  const std::string& storage_precision() const { return storage_name_; }
  std::optional<std::string> spill_dir() const {
    if (core_->spill_dir().empty()) return std::nullopt;
    return core_->spill_dir();
  }
  bool closed() const { return core_->closed(); }

 private:
  core::Storage storage_;
  std::string storage_name_;
  bool track_error_;
  std::shared_ptr<HostPool> pool_;  // declared before core_: outlives it
  std::unique_ptr<core::CacheStoreCore> core_;
  mutable std::mutex err_mu_;
  ErrorStats error_;
};

void translate_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const core::CacheCorruption& e) {
    py::object cls = py::module_::import("stackwise.exceptions").attr("CacheCorruptionError");
    py::object err = cls(e.reason(), e.path());
    PyErr_SetObject(cls.ptr(), err.ptr());
  } catch (const core::CacheBudgetExceeded& e) {
    py::object cls = py::module_::import("stackwise.exceptions").attr("CacheBudgetError");
    PyErr_SetObject(cls.ptr(), cls(e.what()).ptr());
  } catch (const core::CacheKeyMissing& e) {
    PyErr_SetObject(PyExc_KeyError, py::str(e.what()).ptr());
  } catch (const core::CacheIOError& e) {
    PyErr_SetString(PyExc_OSError, e.what());
  }
}

}  // namespace

void register_cache_store(py::module_& m) {
  py::register_exception_translator(&translate_errors);
  using S = ActivationCacheStore;
  py::class_<S>(m, "ActivationCacheStore", R"doc(
Activation cache: entries keyed by (block index, batch id), each a tensor plus companion tensors
and string metadata, kept within a host-memory byte budget and an entry-count budget (0: no
limit). Over a budget the least recently used entries spill to ``spill_dir`` (checksummed files
written atomically); without a spill directory ``put`` raises CacheBudgetError. Thread-safe.
close() (or dropping the store) removes the spill files it wrote; close(keep_files=True) writes
every entry to disk and keeps them for ActivationCacheStore.open(spill_dir).

storage_precision: "as_is", "fp16", "bf16", "int8" or "fp8" (e4m3); int8/fp8 keep one float32
absmax scale per row (last dimension). Lossy precisions apply to the floating value tensor only;
companions are kept exactly. stats() reports the error they introduce.
)doc")
      .def(py::init<int64_t, int64_t, const std::string&, const py::object&, int64_t, bool>(),
           py::arg("max_memory_bytes") = 0, py::arg("max_entries") = 0,
           py::arg("storage_precision") = "as_is", py::arg("spill_dir") = py::none(),
           py::arg("pinned_bytes") = 0, py::arg("track_error") = true)
      .def_static(
          "open",
          [](const py::object& dir, int64_t max_memory_bytes, int64_t max_entries,
             const std::string& storage_precision, int64_t pinned_bytes, bool track_error) {
            return std::make_unique<S>(max_memory_bytes, max_entries, storage_precision, dir,
                                       pinned_bytes, track_error, /*reopen=*/true);
          },
          py::arg("spill_dir"), py::arg("max_memory_bytes") = 0, py::arg("max_entries") = 0,
          py::arg("storage_precision") = "as_is", py::arg("pinned_bytes") = 0,
          py::arg("track_error") = true,
          "A store indexing the spill files already in `spill_dir` (a resumed run's cache). "
          "Raises CacheCorruptionError for a spill file that is not a valid one.")
      .def("put", &S::put, py::arg("block_idx"), py::arg("batch_id"), py::arg("tensor"),
           py::arg("companions") = std::map<std::string, at::Tensor>{},
           py::arg("meta") = std::map<std::string, std::string>{},
           "Stores (or replaces) an entry. A CUDA tensor is copied to host memory on a side "
           "stream ordered after the current one.")
      .def("get", &S::get, py::arg("block_idx"), py::arg("batch_id"), py::arg("device") = py::none(),
           py::arg("release") = false,
           "(tensor, companions, meta) as new tensors on `device` (default CPU); KeyError when "
           "absent, CacheCorruptionError when its spill file fails its checks. release=True: "
           "an entry with a complete spill file leaves memory (its file stays; a later get reads "
           "it again) and its as-is tensors are handed over without a copy; for a reader that "
           "scans batches once, as a trainer over a cache larger than memory does.")
      .def("contains", &S::contains, py::arg("block_idx"), py::arg("batch_id"))
      .def("__contains__", [](const S& s, std::pair<int64_t, int64_t> k) {
        return s.contains(k.first, k.second);
      })
      .def("evict", &S::evict, py::arg("block_idx"), py::arg("batch_id"),
           "Removes an entry and its spill file; KeyError when absent.")
      .def("clear", &S::clear, "Removes every entry and every spill file the store indexes.")
      .def("prefetch", &S::prefetch, py::arg("keys"),
           "Reads the spilled entries among `keys` [(block_idx, batch_id), ...] back into memory "
           "on a background thread.")
      .def("wait_prefetch", &S::wait_prefetch, "Returns when queued prefetches are done.")
      .def("flush", &S::flush, "Writes every in-memory entry that has no spill file yet.")
      .def("close", &S::close, py::arg("keep_files") = false,
           "Stops the prefetch thread and removes the spill files this store wrote; with "
           "keep_files=True writes in-memory entries first so that open() finds everything.")
      .def("keys", &S::keys, "[(block_idx, batch_id), ...] sorted.")
      .def("__len__", [](const S& s) { return s.keys().size(); })
      .def("stats", &S::stats,
           "Counters: bytes and entries in memory / pinned / on disk; hits (gets served from "
           "memory), misses (gets that read the disk), prefetch_hits (hits on entries read ahead), "
           "prefetch_late (gets that waited for a read ahead still in progress), prefetch_skipped "
           "(read-aheads not done: the budgets were full of batches read ahead), released (gets "
           "with release that handed an entry over), write_errors (spill writes that failed), "
           "spills, loads, "
           "read_seconds and bytes_read (spent reading spill files, any thread), "
           "compression errors.")
      .def_property_readonly("storage_precision", &S::storage_precision)
      .def_property_readonly("spill_dir", &S::spill_dir)
      .def_property_readonly("closed", &S::closed)
      .def("__enter__", [](py::object self) { return self; })
      .def("__exit__", [](S& s, py::args) { s.close(false); });
}

}  // namespace stackwise::cache
