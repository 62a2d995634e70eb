// graphopt-arm64-run: run a graphopt artifact's library (a TVM Relax VM executable) on aarch64.
//
//   graphopt-arm64-run [--repeat N] [--transform FUNC --inputs K] LIBRARY OUT_DIR ARG0.npy ARG1.npy ...
//
// The .npy files are main's arguments in order (the model's inputs, then the weights). The
// outputs are written to OUT_DIR/out0.npy, out1.npy, ... (a tuple result is flattened in order).
// With --transform (the manifest's runtime.transform, e.g. main_transform_params), the files
// after the first K are the weights as the artifact stores them (a clustered weight decoded by
// the caller): FUNC runs once on them as a tuple and its outputs, flattened, are the weights
// main takes (the weight packing lifted out of the kernels).
// With --repeat N, main runs N more times and the mean latency is printed as "latency_ms=X"
// (meaningless under qemu; useful on a board). Threads: TVM_NUM_THREADS.
//
// Built by graphopt.targets.arm64_env (tools/arm64_runner/build.sh) with g++-aarch64-linux-gnu against libtvm_runtime.so and
// libtvm_ffi.so from the aarch64 apache-tvm / apache-tvm-ffi wheels; runs under qemu-aarch64 on
// x86 hosts or natively on a board.
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>
#include <tvm/ffi/container/tensor.h>

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstdio>
#include <climits>
#include <cstring>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

namespace {

// 64-byte aligned host memory (TVM's kernels assume at least kAllocAlignment = 64)
struct AlignedAlloc {
  void AllocData(DLTensor* t) {
    size_t n = ffi::GetDataSize(*t);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64 + 64);
    if (t->data == nullptr) throw std::bad_alloc();
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

struct NpyType {
  const char* descr;  // numpy descr without the byte-order character
  DLDataType dl;
};

// little-endian only: aarch64 Linux and x86 are both little-endian
const NpyType kTypes[] = {
    {"f4", {kDLFloat, 32, 1}}, {"f8", {kDLFloat, 64, 1}}, {"f2", {kDLFloat, 16, 1}},
    {"i1", {kDLInt, 8, 1}},    {"i2", {kDLInt, 16, 1}},   {"i4", {kDLInt, 32, 1}},
    {"i8", {kDLInt, 64, 1}},   {"u1", {kDLUInt, 8, 1}},   {"u2", {kDLUInt, 16, 1}},
    {"u4", {kDLUInt, 32, 1}},  {"u8", {kDLUInt, 64, 1}},  {"b1", {kDLBool, 8, 1}},
};

DLDataType ParseDescr(const std::string& d) {
  if (d.size() != 3 || (d[0] != '<' && d[0] != '|')) throw std::runtime_error("unsupported npy dtype " + d);
  for (const auto& t : kTypes)
    if (d.compare(1, 2, t.descr) == 0) return t.dl;
  throw std::runtime_error("unsupported npy dtype " + d);
}

std::string Descr(DLDataType t) {
  for (const auto& k : kTypes)
    if (k.dl.code == t.code && k.dl.bits == t.bits && t.lanes == 1)
      return std::string(t.bits == 8 ? "|" : "<") + k.descr;
  throw std::runtime_error("output dtype has no npy equivalent");
}

// the value of `key` in a numpy header dict literal
std::string HeaderField(const std::string& h, const std::string& key) {
  size_t p = h.find("'" + key + "'");
  if (p == std::string::npos) throw std::runtime_error("npy header lacks " + key);
  p = h.find(':', p) + 1;
  while (h[p] == ' ') ++p;
  size_t e = p;
  if (h[p] == '\'') {
    e = h.find('\'', p + 1);
    return h.substr(p + 1, e - p - 1);
  }
  if (h[p] == '(') return h.substr(p, h.find(')', p) - p + 1);
  while (e < h.size() && h[e] != ',' && h[e] != '}') ++e;
  return h.substr(p, e - p);
}

Tensor LoadNpy(const std::string& path, DLDevice dev) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open " + path);
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) throw std::runtime_error(path + ": not an npy file");
  uint32_t hlen = 0;
  if (magic[6] == 1) {
    uint16_t h16;
    f.read(reinterpret_cast<char*>(&h16), 2);
    hlen = h16;
  } else {
    f.read(reinterpret_cast<char*>(&hlen), 4);
  }
  std::string header(hlen, '\0');
  f.read(header.data(), hlen);
  if (HeaderField(header, "fortran_order").find("False") == std::string::npos)
    throw std::runtime_error(path + ": Fortran-ordered arrays are not supported");
  DLDataType dtype = ParseDescr(HeaderField(header, "descr"));
  std::vector<int64_t> shape;
  std::string s = HeaderField(header, "shape");  // "(1, 3, 16, 16)" or "()" or "(5,)"
  for (size_t i = 1; i < s.size();) {
    while (i < s.size() && (s[i] == ' ' || s[i] == ',')) ++i;
    if (i >= s.size() || s[i] == ')') break;
    size_t j = i;
    while (j < s.size() && s[j] >= '0' && s[j] <= '9') ++j;
    shape.push_back(std::stoll(s.substr(i, j - i)));
    i = j;
  }
  Tensor t = Tensor::FromNDAlloc(AlignedAlloc(), ffi::ShapeView(shape.data(), shape.size()), dtype, dev);
  size_t n = 1;
  for (int64_t d : shape) n *= static_cast<size_t>(d);
  std::vector<char> buf(n * ((dtype.bits + 7) / 8));
  f.read(buf.data(), static_cast<std::streamsize>(buf.size()));
  if (static_cast<size_t>(f.gcount()) != buf.size()) throw std::runtime_error(path + ": truncated data");
  std::memcpy(t.data_ptr(), buf.data(), buf.size());
  return t;
}

void SaveNpy(const std::string& path, const Tensor& t) {
  const DLTensor* d = t.GetDLTensorPtr();
  std::ostringstream shape;
  shape << "(";
  size_t n = 1;
  for (int i = 0; i < d->ndim; ++i) {
    shape << d->shape[i] << (d->ndim == 1 ? "," : (i + 1 < d->ndim ? ", " : ""));
    n *= static_cast<size_t>(d->shape[i]);
  }
  shape << ")";
  std::string header = "{'descr': '" + Descr(d->dtype) + "', 'fortran_order': False, 'shape': " + shape.str() + ", }";
  size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::vector<char> buf(n * ((d->dtype.bits + 7) / 8));
  std::memcpy(buf.data(), static_cast<const char*>(d->data) + d->byte_offset, buf.size());  // main returns compact CPU tensors
  std::ofstream f(path, std::ios::binary);
  f.write("\x93NUMPY\x01\x00", 8);
  uint16_t hlen = static_cast<uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&hlen), 2);
  f << header;
  f.write(buf.data(), static_cast<std::streamsize>(buf.size()));
  if (!f) throw std::runtime_error("cannot write " + path);
}

void Flatten(const ffi::Any& v, std::vector<Tensor>* out) {
  if (auto t = v.as<ffi::Tensor>()) {
    out->push_back(*t);
    return;
  }
  if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& x : *arr) Flatten(x, out);
    return;
  }
  throw std::runtime_error("main returned something that is neither a tensor nor a tuple: " + v.GetTypeKey());
}

}  // namespace

int main(int argc, char** argv) {
  int repeat = 0;
  int n_inputs = -1;
  std::string transform;
  int a = 1;
  while (a + 1 < argc && std::strncmp(argv[a], "--", 2) == 0) {
    std::string opt = argv[a];
    if (opt == "--repeat") {
      repeat = std::atoi(argv[a + 1]);
    } else if (opt == "--transform") {
      transform = argv[a + 1];
    } else if (opt == "--inputs") {
      n_inputs = std::atoi(argv[a + 1]);
    } else {
      std::fprintf(stderr, "graphopt-arm64-run: unknown option %s\n", opt.c_str());
      return 2;
    }
    a += 2;
  }
  if (argc - a < 2 || (!transform.empty() && (n_inputs < 0 || n_inputs > argc - a - 2))) {
    std::fprintf(stderr, "usage: %s [--repeat N] [--transform FUNC --inputs K] LIBRARY OUT_DIR ARG.npy...\n", argv[0]);
    return 2;
  }
  try {
    // dlopen searches the library path for a name without a slash: make it absolute
    char* resolved = realpath(argv[a], nullptr);
    if (resolved == nullptr) throw std::runtime_error(std::string("no such library: ") + argv[a]);
    std::string lib_path = resolved, out_dir = argv[a + 1];
    std::free(resolved);
    DLDevice dev{kDLCPU, 0};
    ffi::Module lib = ffi::Module::LoadFromFile(lib_path);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, 2 /* pooled allocator */);
    ffi::Function fmain = vm->GetFunction("main").value();
    std::vector<Tensor> args;
    for (int i = a + 2; i < argc; ++i) args.push_back(LoadNpy(argv[i], dev));
    if (!transform.empty()) {  // once, before main: stored weights -> the weights main takes
      auto f = vm->GetFunction(transform);
      if (!f.has_value()) throw std::runtime_error("the library has no function " + transform);
      ffi::Array<ffi::Any> stored(args.begin() + n_inputs, args.end());
      std::vector<Tensor> weights;
      Flatten(f.value()(stored), &weights);
      args.resize(n_inputs);
      args.insert(args.end(), weights.begin(), weights.end());
    }
    std::vector<ffi::AnyView> views(args.begin(), args.end());
    ffi::Any result;
    fmain.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
    std::vector<Tensor> outs;
    Flatten(result, &outs);
    for (size_t i = 0; i < outs.size(); ++i) SaveNpy(out_dir + "/out" + std::to_string(i) + ".npy", outs[i]);
    if (repeat > 0) {
      auto t0 = std::chrono::steady_clock::now();
      for (int r = 0; r < repeat; ++r) fmain.CallPacked(views.data(), static_cast<int32_t>(views.size()), &result);
      double ms = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / repeat;
      std::printf("latency_ms=%.4f\n", ms);
    }
    std::printf("outputs=%zu\n", outs.size());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "graphopt-arm64-run: %s\n", e.what());
    return 1;
  }
  return 0;
}
