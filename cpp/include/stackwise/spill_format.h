// The activation-cache entry and its spill file format (torch-free).
//
// An entry is one (block index, batch id) key holding named tensor records (the activation
// "value" and companions such as masks or token ids) and small string metadata. A record is
// opaque bytes plus what is needed to read them back: dtype code, shape, storage precision.
//
// Spill file, version 2 (little-endian hosts; all integers in host order):
//   fixed header, 32 bytes:
//     magic "SWACTCH\0" (8) | u32 format version | u32 header_bytes (fixed + variable part)
//     | u64 payload_bytes | u32 CRC-32C | u32 reserved (0)
//   variable header:
//     i64 block | i64 batch | u64 store id | u64 generation | u32 n_records | u32 n_meta
//     per record: u16 name length, name, u8 dtype, u8 storage, u8 ndim, u8 reserved,
//                 i64 dims[ndim], u64 payload length
//     per meta item: u32 key length, key, u32 value length, value
//   payloads: the records' bytes, concatenated in record order.
// The CRC-32C covers the whole header (its own field read as 0) and every payload byte. A file is
// written to a temporary name in the same directory, fsynced, renamed, and the directory fsynced,
// so a reader sees either no file or a complete one.
//
// Owner: the store id (random, one per store) and the entry's generation (one per put) are in
// the header and in the file name, blk<block>_batch<batch>.<store id, 16 hex>-<generation>.swspill:
// two stores sharing a spill directory never write the same name, a store reads back only a file
// carrying the owner it recorded, and a late write of a replaced generation cannot overwrite or
// delete the current one's file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace stackwise::core {

inline constexpr char kSpillMagic[8] = {'S', 'W', 'A', 'C', 'T', 'C', 'H', '\0'};
inline constexpr uint32_t kSpillFormatVersion = 2;
inline constexpr size_t kSpillFixedHeaderBytes = 32;
inline constexpr const char* kSpillSuffix = ".swspill";
inline constexpr const char* kSpillTempPrefix = ".tmp-";

// Element types of stored tensors (codes are part of the file format: never renumber).
enum class DType : uint8_t {
  kFloat32 = 1, kFloat64 = 2, kFloat16 = 3, kBFloat16 = 4, kInt8 = 5, kUInt8 = 6, kInt16 = 7,
  kInt32 = 8, kInt64 = 9, kBool = 10, kFloat8E4M3 = 11, kFloat8E5M2 = 12,
};
// How a record's payload encodes its tensor (codes are part of the file format).
//   as_is: the raw bytes of dtype; fp16/bf16: 2-byte values; int8/fp8: one byte per element
//   followed by one float32 scale per row (row = the last dimension, a 0-d tensor is one row).
enum class Storage : uint8_t { kAsIs = 0, kFloat16 = 1, kBFloat16 = 2, kInt8 = 3, kFp8 = 4 };

size_t dtype_size(DType d);  // 0 for an unknown code
bool valid_dtype(uint8_t code);
bool valid_storage(uint8_t code);
const char* storage_name(Storage s);

// Owned bytes; `pinned` marks page-locked host memory (accounted separately).
struct Blob {
  std::shared_ptr<uint8_t> data;
  size_t size = 0;
  bool pinned = false;
};
// Returns a blob of `size` uninitialised bytes.
using BlobAllocator = Blob (*)(size_t size, void* ctx);
Blob allocate_host_blob(size_t size);

struct TensorRecord {
  std::string name;
  DType dtype = DType::kFloat32;
  Storage storage = Storage::kAsIs;
  std::vector<int64_t> shape;
  Blob payload;
};

struct CacheKey {
  int64_t block = 0;
  int64_t batch = 0;
  bool operator==(const CacheKey& o) const { return block == o.block && batch == o.batch; }
};
struct CacheKeyHash {
  size_t operator()(const CacheKey& k) const {
    return std::hash<int64_t>()(k.block) * 1000003u ^ std::hash<int64_t>()(k.batch);
  }
};

struct EntryData {
  std::vector<TensorRecord> records;
  std::vector<std::pair<std::string, std::string>> meta;
  size_t payload_bytes() const;
  bool pinned() const;  // any record in pinned memory
};

// The payload length a record must have (throws std::invalid_argument on a bad shape/code).
size_t expected_payload_bytes(DType dtype, Storage storage, const std::vector<int64_t>& shape);
// Throws std::invalid_argument when a record's payload does not match its description.
void validate_record(const TensorRecord& r);

// A spill file that cannot be trusted: corrupt, truncated, foreign or of another version.
class CacheCorruption : public std::runtime_error {
 public:
  CacheCorruption(const std::string& path, const std::string& what)
      : std::runtime_error(path + ": " + what), path_(path), reason_(what) {}
  const std::string& path() const { return path_; }
  const std::string& reason() const { return reason_; }

 private:
  std::string path_, reason_;
};
// An operating-system failure while writing or reading (disk full, permissions).
class CacheIOError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Who wrote a spill file: the store's id and the entry's generation in that store.
struct SpillOwner {
  uint64_t store = 0;
  uint64_t gen = 0;
  bool operator==(const SpillOwner& o) const { return store == o.store && gen == o.gen; }
};

// What a header says, validated for size and consistency (payload CRC not checked).
struct SpillHeader {
  CacheKey key;
  SpillOwner owner;
  uint64_t header_bytes = 0, payload_bytes = 0;
  uint32_t crc = 0;
  EntryData layout;  // records without payloads, and the metadata
};

std::string spill_file_name(const CacheKey& key, const SpillOwner& owner);
bool parse_spill_file_name(const std::string& name, CacheKey* key, SpillOwner* owner);
std::string hex_id(uint64_t id);  // 16 lower-case hex digits

// Atomically writes `entry` as `dir/spill_file_name(key, owner)`; returns the path and size.
std::pair<std::string, uint64_t> write_spill_file(const std::string& dir, const CacheKey& key,
                                                  const EntryData& entry,
                                                  const SpillOwner& owner = {});
SpillHeader read_spill_header(const std::string& path);
// Reads and fully validates a file (header, sizes, CRC, and the key and owner when given);
// payloads from `alloc`.
EntryData read_spill_file(const std::string& path, const CacheKey* expect_key = nullptr,
                          BlobAllocator alloc = nullptr, void* alloc_ctx = nullptr,
                          const SpillOwner* expect_owner = nullptr);

}  // namespace stackwise::core
