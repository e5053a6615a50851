// Run an escort-tvm .so with TVM's C++ runtime alone: load, read the embedded metadata, call "main".
// CPU as written; docs/deploy.md says what a CUDA deployment adds. Build (TVM = the tvm wheel's folder,
// TVM_FFI = the tvm_ffi wheel's folder):
//   g++ -std=c++17 deploy_runtime_only.cc -I$TVM/include -I$TVM_FFI/include -L$TVM/lib -L$TVM_FFI/lib \
//       -ltvm_runtime -ltvm_ffi -Wl,-rpath,$TVM/lib -Wl,-rpath,$TVM_FFI/lib -o deploy
//   ./deploy ./model.so input.f32 1 3 224 224
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

struct CPUAlloc {  // host memory for the input tensor
  void AllocData(DLTensor* t) { t->data = std::malloc(ffi::GetDataSize(*t)); }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

int main(int argc, char** argv) {
  if (argc < 4) {
    std::fprintf(stderr, "usage: %s ./model.so input.f32 DIM...  (raw float32 input of that shape)\n", argv[0]);
    return 2;
  }
  ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
  // The .so holds a Relax VM executable: make a VM and give it its devices (here the CPU, pooled memory).
  ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
  DLDevice dev{kDLCPU, 0};
  const int kPooledAllocator = 2;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(dev.device_type), dev.device_id,
                                                kPooledAllocator);
  // escort-tvm embeds its metadata (input names/shapes/dtypes, target, per-conv report) as JSON bytes.
  auto meta = vm->GetFunction("escort_tvm_metadata").value()().cast<ffi::Tensor>();
  std::string json(static_cast<const char*>(meta.data_ptr()), meta.shape()[0]);
  std::printf("metadata: %.100s ...\n", json.c_str());

  std::vector<int64_t> shape;  // must equal the metadata's "inputs" shape
  for (int i = 3; i < argc; ++i) shape.push_back(std::atoll(argv[i]));
  ffi::Tensor x = ffi::Tensor::FromNDAlloc(CPUAlloc(), ffi::ShapeView(shape.data(), shape.size()),
                                           DLDataType{kDLFloat, 32, 1}, dev);
  std::ifstream in(argv[2], std::ios::binary);
  if (!in.read(static_cast<char*>(x.data_ptr()), ffi::GetDataSize(*x.GetDLTensorPtr()))) {
    std::fprintf(stderr, "%s: too short for that shape\n", argv[2]);
    return 1;
  }
  ffi::Tensor y = vm->GetFunction("main").value()(x).cast<ffi::Tensor>();
  const float* out = static_cast<const float*>(y.data_ptr());
  std::printf("output");
  for (int64_t d : y.shape()) std::printf(" %ld", static_cast<long>(d));
  std::printf(":");
  for (int64_t i = 0; i < y.numel(); ++i) std::printf(" %.9g", out[i]);  // all values, for checking
  std::printf("\n");
  return 0;
}
