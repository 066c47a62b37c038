// Spill file writing and validated reading (format in stackwise/spill_format.h).
// Torch-free; POSIX I/O so the file and its directory can be fsynced.
#include "stackwise/spill_format.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>
#include <thread>

#include "stackwise/crc32c.h"

static_assert(std::endian::native == std::endian::little, "spill files assume little-endian");

namespace stackwise::core {
namespace {

// Sanity limits for a header read from disk: far above any real entry, low enough that a
// corrupt length cannot make the reader allocate gigabytes for the header.
constexpr uint64_t kMaxHeaderBytes = 16u << 20;
constexpr uint32_t kMaxRecords = 4096;
constexpr uint32_t kMaxMeta = 4096;
constexpr uint8_t kMaxDims = 16;

std::string errno_text(const char* what, const std::string& path) {
  return std::string(what) + " " + path + ": " + std::strerror(errno);
}

class Fd {
 public:
  explicit Fd(int fd) : fd_(fd) {}
  ~Fd() { if (fd_ >= 0) ::close(fd_); }
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  int get() const { return fd_; }
  int release() { int f = fd_; fd_ = -1; return f; }

 private:
  int fd_;
};

// Bytes written between requests to start write-back: the disk then works while the next chunk
// is copied in, and the closing fsync waits for less (measured on 64 MiB entries: fsync 28 ms
// alone after a plain write).
constexpr size_t kWritebackChunk = size_t(8) << 20;

// Payloads from this size on are checksummed on a helper thread while the main thread writes
// them: the CRC (~10 ms for 64 MiB with the 3-stream SSE4.2 path) then hides behind the write
// syscalls (~20 ms of page-cache copy) instead of adding to them. Below it a thread start is
// not worth it.
constexpr size_t kParallelCrcBytes = size_t(4) << 20;

// Writes n bytes in chunks of kWritebackChunk, starting write-back after each.
void write_all(int fd, const uint8_t* p, size_t n, const std::string& path, uint64_t* offset) {
  uint64_t started = *offset - (*offset % kWritebackChunk);
  while (n > 0) {
    const size_t chunk = std::min(n, kWritebackChunk);
    size_t done = 0;
    while (done < chunk) {
      ssize_t w = ::write(fd, p + done, chunk - done);
      if (w < 0) {
        if (errno == EINTR) continue;
        throw CacheIOError(errno_text("cannot write", path));
      }
      done += static_cast<size_t>(w);
    }
    p += chunk;
    n -= chunk;
    *offset += chunk;
#if defined(__linux__)
    if (*offset - started >= kWritebackChunk) {
      ::sync_file_range(fd, static_cast<off_t>(started), static_cast<off_t>(*offset - started),
                        SYNC_FILE_RANGE_WRITE);
      started = *offset;
    }
#endif
  }
}

// Reads exactly n bytes at offset, or reports how many were there (short file).
size_t read_at(int fd, uint8_t* p, size_t n, uint64_t off, const std::string& path) {
  size_t got = 0;
  while (got < n) {
    ssize_t r = ::pread(fd, p + got, n - got, static_cast<off_t>(off + got));
    if (r < 0) {
      if (errno == EINTR) continue;
      throw CacheIOError(errno_text("cannot read", path));
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  return got;
}

class Writer {
 public:
  template <class T> void put(T v) {
    const auto* p = reinterpret_cast<const uint8_t*>(&v);
    buf.insert(buf.end(), p, p + sizeof(T));
  }
  void bytes(const std::string& s) { buf.insert(buf.end(), s.begin(), s.end()); }
  std::vector<uint8_t> buf;
};

class Reader {
 public:
  Reader(const uint8_t* p, size_t n, const std::string& path) : p_(p), n_(n), path_(path) {}
  template <class T> T get() {
    need(sizeof(T));
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(size_t len) {
    need(len);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  size_t pos() const { return pos_; }

 private:
  void need(size_t k) {
    if (k > n_ - pos_) throw CacheCorruption(path_, "header is shorter than its fields");
  }
  const uint8_t* p_;
  size_t n_, pos_ = 0;
  const std::string& path_;
};

std::vector<uint8_t> encode_header(const CacheKey& key, const SpillOwner& owner,
                                   const EntryData& e) {
  Writer w;
  w.buf.resize(kSpillFixedHeaderBytes, 0);
  w.put<int64_t>(key.block);
  w.put<int64_t>(key.batch);
  w.put<uint64_t>(owner.store);
  w.put<uint64_t>(owner.gen);
  w.put<uint32_t>(static_cast<uint32_t>(e.records.size()));
  w.put<uint32_t>(static_cast<uint32_t>(e.meta.size()));
  for (const auto& r : e.records) {
    if (r.name.size() > 0xFFFF) throw std::invalid_argument("record name longer than 65535 bytes");
    w.put<uint16_t>(static_cast<uint16_t>(r.name.size()));
    w.bytes(r.name);
    w.put<uint8_t>(static_cast<uint8_t>(r.dtype));
    w.put<uint8_t>(static_cast<uint8_t>(r.storage));
    w.put<uint8_t>(static_cast<uint8_t>(r.shape.size()));
    w.put<uint8_t>(0);
    for (int64_t d : r.shape) w.put<int64_t>(d);
    w.put<uint64_t>(r.payload.size);
  }
  for (const auto& [k, v] : e.meta) {
    w.put<uint32_t>(static_cast<uint32_t>(k.size()));
    w.bytes(k);
    w.put<uint32_t>(static_cast<uint32_t>(v.size()));
    w.bytes(v);
  }
  const uint32_t header_bytes = static_cast<uint32_t>(w.buf.size());
  const uint64_t payload_bytes = e.payload_bytes();
  uint8_t* h = w.buf.data();
  std::memcpy(h, kSpillMagic, 8);
  std::memcpy(h + 8, &kSpillFormatVersion, 4);
  std::memcpy(h + 12, &header_bytes, 4);
  std::memcpy(h + 16, &payload_bytes, 8);
  return w.buf;  // CRC field (offset 24) still 0
}

}  // namespace

size_t dtype_size(DType d) {
  switch (d) {
    case DType::kFloat64: case DType::kInt64: return 8;
    case DType::kFloat32: case DType::kInt32: return 4;
    case DType::kFloat16: case DType::kBFloat16: case DType::kInt16: return 2;
    case DType::kInt8: case DType::kUInt8: case DType::kBool: case DType::kFloat8E4M3:
    case DType::kFloat8E5M2: return 1;
  }
  return 0;
}
bool valid_dtype(uint8_t c) { return c >= 1 && c <= 12; }
bool valid_storage(uint8_t c) { return c <= 4; }
const char* storage_name(Storage s) {
  switch (s) {
    case Storage::kAsIs: return "as_is";
    case Storage::kFloat16: return "fp16";
    case Storage::kBFloat16: return "bf16";
    case Storage::kInt8: return "int8";
    case Storage::kFp8: return "fp8";
  }
  return "unknown";
}

Blob allocate_host_blob(size_t size) {
  Blob b;
  // malloc, not new[]: no zero-fill of 64 MB buffers that are overwritten at once.
  void* p = std::malloc(size ? size : 1);
  if (!p) throw std::bad_alloc();
  b.data = std::shared_ptr<uint8_t>(static_cast<uint8_t*>(p), [](uint8_t* q) { std::free(q); });
  b.size = size;
  return b;
}

size_t EntryData::payload_bytes() const {
  size_t n = 0;
  for (const auto& r : records) n += r.payload.size;
  return n;
}
bool EntryData::pinned() const {
  for (const auto& r : records) if (r.payload.pinned) return true;
  return false;
}

size_t expected_payload_bytes(DType dtype, Storage storage, const std::vector<int64_t>& shape) {
  if (!valid_dtype(static_cast<uint8_t>(dtype))) throw std::invalid_argument("unknown dtype code");
  if (shape.size() > kMaxDims) throw std::invalid_argument("more than 16 dimensions");
  uint64_t numel = 1;
  for (int64_t d : shape) {
    if (d < 0 || (d > 0 && numel > (uint64_t(1) << 48) / uint64_t(d)))
      throw std::invalid_argument("bad dimension in shape");
    numel *= uint64_t(d);
  }
  const uint64_t last = shape.empty() ? 1 : uint64_t(shape.back());
  const uint64_t rows = last == 0 ? 0 : numel / last;
  switch (storage) {
    case Storage::kAsIs: return numel * dtype_size(dtype);
    case Storage::kFloat16: case Storage::kBFloat16: return numel * 2;
    case Storage::kInt8: case Storage::kFp8: return numel + rows * 4;
  }
  throw std::invalid_argument("unknown storage code");
}

void validate_record(const TensorRecord& r) {
  const size_t want = expected_payload_bytes(r.dtype, r.storage, r.shape);
  if (r.payload.size != want)
    throw std::invalid_argument("record '" + r.name + "': payload has " +
                                std::to_string(r.payload.size) + " bytes, its shape needs " +
                                std::to_string(want));
}

std::string hex_id(uint64_t id) {
  char buf[17];
  std::snprintf(buf, sizeof(buf), "%016llx", static_cast<unsigned long long>(id));
  return buf;
}

std::string spill_file_name(const CacheKey& key, const SpillOwner& owner) {
  return "blk" + std::to_string(key.block) + "_batch" + std::to_string(key.batch) + "." +
         hex_id(owner.store) + "-" + std::to_string(owner.gen) + kSpillSuffix;
}

bool parse_spill_file_name(const std::string& name, CacheKey* key, SpillOwner* owner) {
  long long b = 0, n = 0;
  unsigned long long store = 0, gen = 0;
  int used = 0;
  const std::string suffix = kSpillSuffix;
  if (name.size() <= suffix.size() || name.compare(name.size() - suffix.size(), suffix.size(),
                                                   suffix) != 0)
    return false;
  const std::string stem = name.substr(0, name.size() - suffix.size());
  if (std::sscanf(stem.c_str(), "blk%lld_batch%lld.%16llx-%llu%n", &b, &n, &store, &gen,
                  &used) != 4)
    return false;
  if (static_cast<size_t>(used) != stem.size()) return false;
  *key = {b, n};
  *owner = {store, gen};
  return spill_file_name(*key, *owner) == name;  // canonical spelling only
}

std::pair<std::string, uint64_t> write_spill_file(const std::string& dir, const CacheKey& key,
                                                  const EntryData& entry,
                                                  const SpillOwner& owner) {
  for (const auto& r : entry.records) validate_record(r);
  std::vector<uint8_t> header = encode_header(key, owner, entry);
  uint32_t crc = crc32c_update(0, header.data(), header.size());  // CRC field still 0

  static std::atomic<uint64_t> counter{0};
  const std::string final_path = dir + "/" + spill_file_name(key, owner);
  const std::string tmp_path = dir + "/" + kSpillTempPrefix + spill_file_name(key, owner) + "." +
                               std::to_string(::getpid()) + "." + std::to_string(counter++);
  Fd fd(::open(tmp_path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644));
  if (fd.get() < 0) throw CacheIOError(errno_text("cannot create", tmp_path));
  // The checksum of header and payloads, in file order; it is only needed for the header field
  // written after the payload, so it may run beside the writes.
  auto checksum_payloads = [&entry, &crc] {
    for (const auto& r : entry.records)
      crc = crc32c_update(crc, r.payload.data.get(), r.payload.size);
  };
  try {
    uint64_t offset = 0;
    {
      // jthread: joined on every exit from this scope, a throwing write included.
      std::jthread crc_worker;
      if (entry.payload_bytes() >= kParallelCrcBytes) crc_worker = std::jthread(checksum_payloads);
      else checksum_payloads();
      write_all(fd.get(), header.data(), header.size(), tmp_path, &offset);
      for (const auto& r : entry.records)
        write_all(fd.get(), r.payload.data.get(), r.payload.size, tmp_path, &offset);
    }
    // The checksum is known once the payload is written: fill in the header's field.
    if (::pwrite(fd.get(), &crc, 4, 24) != 4)
      throw CacheIOError(errno_text("cannot write", tmp_path));
    if (::fsync(fd.get()) != 0) throw CacheIOError(errno_text("cannot fsync", tmp_path));
    if (::close(fd.release()) != 0) throw CacheIOError(errno_text("cannot close", tmp_path));
    if (::rename(tmp_path.c_str(), final_path.c_str()) != 0)
      throw CacheIOError(errno_text("cannot rename to", final_path));
  } catch (...) {
    ::unlink(tmp_path.c_str());
    throw;
  }
  // The rename is durable only once the directory entry is on disk.
  Fd dfd(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (dfd.get() >= 0) ::fsync(dfd.get());
  return {final_path, header.size() + entry.payload_bytes()};
}

namespace {

// Parses and checks the header; on return `fixed` and `var` hold its bytes.
SpillHeader parse_header(int fd, const std::string& path, uint64_t file_size,
                         std::vector<uint8_t>* bytes) {
  uint8_t fixed[kSpillFixedHeaderBytes];
  if (read_at(fd, fixed, sizeof(fixed), 0, path) != sizeof(fixed)) {
    if (file_size >= 8 && std::memcmp(fixed, kSpillMagic, 8) != 0)
      throw CacheCorruption(path, "not a stackwise cache spill file (wrong magic)");
    throw CacheCorruption(path, "truncated: shorter than the spill file header");
  }
  if (std::memcmp(fixed, kSpillMagic, 8) != 0)
    throw CacheCorruption(path, "not a stackwise cache spill file (wrong magic)");
  SpillHeader h;
  uint32_t version, header_bytes;
  std::memcpy(&version, fixed + 8, 4);
  std::memcpy(&header_bytes, fixed + 12, 4);
  std::memcpy(&h.payload_bytes, fixed + 16, 8);
  std::memcpy(&h.crc, fixed + 24, 4);
  h.header_bytes = header_bytes;
  if (version != kSpillFormatVersion)
    throw CacheCorruption(path, "spill format version " + std::to_string(version) +
                                    ", this build reads version " +
                                    std::to_string(kSpillFormatVersion));
  if (h.header_bytes < kSpillFixedHeaderBytes + 40 || h.header_bytes > kMaxHeaderBytes)
    throw CacheCorruption(path, "implausible header length " + std::to_string(h.header_bytes));
  if (file_size != h.header_bytes + h.payload_bytes)
    throw CacheCorruption(path, (file_size < h.header_bytes + h.payload_bytes ? "truncated: "
                                                                              : "trailing bytes: ") +
                                    std::to_string(file_size) + " bytes, the header says " +
                                    std::to_string(h.header_bytes + h.payload_bytes));
  bytes->resize(h.header_bytes);
  std::memcpy(bytes->data(), fixed, sizeof(fixed));
  const size_t rest = h.header_bytes - kSpillFixedHeaderBytes;
  if (read_at(fd, bytes->data() + kSpillFixedHeaderBytes, rest, kSpillFixedHeaderBytes, path) !=
      rest)
    throw CacheCorruption(path, "truncated header");
  std::memset(bytes->data() + 24, 0, 4);

  Reader r(bytes->data() + kSpillFixedHeaderBytes, rest, path);
  h.key.block = r.get<int64_t>();
  h.key.batch = r.get<int64_t>();
  h.owner.store = r.get<uint64_t>();
  h.owner.gen = r.get<uint64_t>();
  const uint32_t n_records = r.get<uint32_t>(), n_meta = r.get<uint32_t>();
  if (n_records > kMaxRecords || n_meta > kMaxMeta)
    throw CacheCorruption(path, "implausible record or metadata count");
  uint64_t total = 0;
  for (uint32_t i = 0; i < n_records; ++i) {
    TensorRecord rec;
    rec.name = r.str(r.get<uint16_t>());
    const uint8_t dt = r.get<uint8_t>(), st = r.get<uint8_t>(), nd = r.get<uint8_t>();
    r.get<uint8_t>();
    if (!valid_dtype(dt) || !valid_storage(st) || nd > kMaxDims)
      throw CacheCorruption(path, "record '" + rec.name + "' has an unknown dtype/storage code");
    rec.dtype = static_cast<DType>(dt);
    rec.storage = static_cast<Storage>(st);
    for (uint8_t d = 0; d < nd; ++d) rec.shape.push_back(r.get<int64_t>());
    rec.payload.size = r.get<uint64_t>();
    size_t want;
    try {
      want = expected_payload_bytes(rec.dtype, rec.storage, rec.shape);
    } catch (const std::invalid_argument& e) {
      throw CacheCorruption(path, "record '" + rec.name + "': " + e.what());
    }
    if (want != rec.payload.size)
      throw CacheCorruption(path, "record '" + rec.name + "' payload length disagrees with shape");
    total += rec.payload.size;
    h.layout.records.push_back(std::move(rec));
  }
  for (uint32_t i = 0; i < n_meta; ++i) {
    std::string k = r.str(r.get<uint32_t>());
    std::string v = r.str(r.get<uint32_t>());
    h.layout.meta.emplace_back(std::move(k), std::move(v));
  }
  if (r.pos() != rest) throw CacheCorruption(path, "header has unread trailing bytes");
  if (total != h.payload_bytes) throw CacheCorruption(path, "payload lengths disagree");
  return h;
}

uint64_t file_size_of(int fd, const std::string& path) {
  struct stat st;
  if (::fstat(fd, &st) != 0) throw CacheIOError(errno_text("cannot stat", path));
  return static_cast<uint64_t>(st.st_size);
}

}  // namespace

SpillHeader read_spill_header(const std::string& path) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw CacheIOError(errno_text("cannot open", path));
  std::vector<uint8_t> bytes;
  return parse_header(fd.get(), path, file_size_of(fd.get(), path), &bytes);
}

EntryData read_spill_file(const std::string& path, const CacheKey* expect_key,
                          BlobAllocator alloc, void* alloc_ctx, const SpillOwner* expect_owner) {
  Fd fd(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
  if (fd.get() < 0) throw CacheIOError(errno_text("cannot open", path));
  std::vector<uint8_t> bytes;
  SpillHeader h = parse_header(fd.get(), path, file_size_of(fd.get(), path), &bytes);
  if (expect_key && !(h.key == *expect_key))
    throw CacheCorruption(path, "holds block " + std::to_string(h.key.block) + " batch " +
                                    std::to_string(h.key.batch) + ", not the entry it is named for");
  if (expect_owner && !(h.owner == *expect_owner))
    throw CacheCorruption(path, "written by store " + hex_id(h.owner.store) + " as entry " +
                                    std::to_string(h.owner.gen) + ", not by store " +
                                    hex_id(expect_owner->store) + " as entry " +
                                    std::to_string(expect_owner->gen) +
                                    " (another store or process wrote into this spill directory)");
  uint32_t crc = crc32c_update(0, bytes.data(), bytes.size());
  uint64_t off = h.header_bytes;
  for (auto& rec : h.layout.records) {
    const size_t n = rec.payload.size;
    rec.payload = alloc ? alloc(n, alloc_ctx) : allocate_host_blob(n);
    if (read_at(fd.get(), rec.payload.data.get(), n, off, path) != n)
      throw CacheCorruption(path, "truncated payload");
    crc = crc32c_update(crc, rec.payload.data.get(), n);
    off += n;
  }
  if (crc != h.crc) throw CacheCorruption(path, "checksum mismatch (CRC-32C)");
  return std::move(h.layout);
}

}  // namespace stackwise::core
