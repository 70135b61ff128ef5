// Buffers whose rows start on a cache line. A matrix tile's row of 64 bytes that straddles two lines loads ~6x slower
// (this VM, Intel Xeon with AMX: a 1 KiB tile from L1 15 ns against 2.3 ns aligned), and malloc aligns to 16 bytes
// only: every buffer a kernel allocates for the AMX tiles to read is a CacheLineVector. (Weights lie in torch's
// tensors, which torch aligns to 64 bytes.)
#pragma once
#include <cstddef>
#include <new>
#include <vector>

namespace slipstream {

inline constexpr std::size_t CACHE_LINE = 64;

// Allocates on cache lines; elements it constructs without a value are left uninitialised (what a buffer that is
// written before it is read wants: resize() does not zero it).
template <class T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <class U>
  CacheLineAllocator(const CacheLineAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{CACHE_LINE}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{CACHE_LINE}); }
  template <class U>
  void construct(U* p) noexcept {  // (with a value, allocator_traits constructs from it as std::allocator does)
    ::new (static_cast<void*>(p)) U;
  }
  template <class U>
  bool operator==(const CacheLineAllocator<U>&) const noexcept {
    return true;
  }
};

template <class T>
using CacheLineVector = std::vector<T, CacheLineAllocator<T>>;

}  // namespace slipstream
