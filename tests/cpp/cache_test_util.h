// Helpers for the cache-store core tests: temporary directories and entries of known bytes.
#pragma once

#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "stackwise/spill_format.h"

namespace stackwise::core::testing {

struct TempDir {
  TempDir() {
    std::string tmpl = (std::filesystem::temp_directory_path() / "swcache-XXXXXX").string();
    char* p = ::mkdtemp(tmpl.data());
    if (!p) std::abort();
    path = p;
  }
  ~TempDir() { std::filesystem::remove_all(path); }
  std::string path;
};

// A float32 [rows, cols] "value" record filled with a pattern derived from `seed`, plus a
// bool mask companion and one metadata item.
inline std::shared_ptr<EntryData> make_entry(int64_t rows, int64_t cols, uint32_t seed) {
  auto e = std::make_shared<EntryData>();
  TensorRecord v;
  v.name = "value";
  v.dtype = DType::kFloat32;
  v.shape = {rows, cols};
  v.payload = allocate_host_blob(size_t(rows * cols) * 4);
  auto* f = reinterpret_cast<float*>(v.payload.data.get());
  for (int64_t i = 0; i < rows * cols; ++i) f[i] = float(seed) + 0.25f * float(i % 97);
  e->records.push_back(v);
  TensorRecord m;
  m.name = "mask";
  m.dtype = DType::kBool;
  m.shape = {rows};
  m.payload = allocate_host_blob(size_t(rows));
  for (int64_t i = 0; i < rows; ++i) m.payload.data.get()[i] = uint8_t((i + seed) % 2);
  e->records.push_back(m);
  e->meta.emplace_back("seed", std::to_string(seed));
  return e;
}

inline bool same_entry(const EntryData& a, const EntryData& b) {
  if (a.records.size() != b.records.size() || a.meta != b.meta) return false;
  for (size_t i = 0; i < a.records.size(); ++i) {
    const auto &x = a.records[i], &y = b.records[i];
    if (x.name != y.name || x.dtype != y.dtype || x.storage != y.storage || x.shape != y.shape ||
        x.payload.size != y.payload.size ||
        std::memcmp(x.payload.data.get(), y.payload.data.get(), x.payload.size) != 0)
      return false;
  }
  return true;
}

// The spill file holding `key` in dir (any owner), or "" when there is none.
inline std::string spill_file(const std::string& dir, CacheKey key) {
  const std::string prefix = "blk" + std::to_string(key.block) + "_batch" +
                             std::to_string(key.batch) + ".";
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    const std::string name = f.path().filename().string();
    CacheKey k;
    SpillOwner o;
    if (name.rfind(prefix, 0) == 0 && parse_spill_file_name(name, &k, &o)) return f.path().string();
  }
  return "";
}

// Spill files in dir (lock files and anything else left out).
inline long count_spill_files(const std::string& dir) {
  long n = 0;
  for (const auto& f : std::filesystem::directory_iterator(dir)) {
    CacheKey k;
    SpillOwner o;
    n += parse_spill_file_name(f.path().filename().string(), &k, &o) ? 1 : 0;
  }
  return n;
}

}  // namespace stackwise::core::testing
