# CUDA backend of oscar (included by the top-level CMakeLists.txt when nvcc is
# found and OSCAR_CUDA is ON). Adds the .cu sources to target `oscar`.
find_package(CUDAToolkit REQUIRED)

set(OSCAR_CUDA_ARCHS "90a" CACHE STRING
    "CUDA targets of the oscar backend: 90a = sm_90a code; add 90 for sm_90 code + PTX")

file(GLOB OSCAR_CUDA_SOURCES CONFIGURE_DEPENDS ${CMAKE_CURRENT_LIST_DIR}/*.cu)
target_sources(oscar PRIVATE ${OSCAR_CUDA_SOURCES})
target_compile_definitions(oscar PRIVATE OSCAR_HAVE_CUDA=1)
target_link_libraries(oscar PRIVATE CUDA::cudart)

set(_oscar_gencode)
foreach(a ${OSCAR_CUDA_ARCHS})
  if(a STREQUAL "90a")
    list(APPEND _oscar_gencode "-gencode=arch=compute_90a,code=sm_90a")
  else()
    list(APPEND _oscar_gencode "-gencode=arch=compute_${a},code=[sm_${a},compute_${a}]")
  endif()
endforeach()
# The architectures are given as explicit -gencode flags (CMake's
# CUDA_ARCHITECTURES cannot express sm_90a on every CMake version we support).
set_property(TARGET oscar PROPERTY CUDA_ARCHITECTURES OFF)
set_property(TARGET oscar PROPERTY CUDA_STANDARD 17)
set_property(TARGET oscar PROPERTY CUDA_STANDARD_REQUIRED ON)
set_property(TARGET oscar PROPERTY CUDA_SEPARABLE_COMPILATION OFF)
target_compile_options(oscar PRIVATE
  $<$<COMPILE_LANGUAGE:CUDA>:${_oscar_gencode}>
  $<$<COMPILE_LANGUAGE:CUDA>:-O3>
  $<$<COMPILE_LANGUAGE:CUDA>:--expt-relaxed-constexpr>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-fPIC>
  $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-fvisibility=hidden>)

# The top-level warning flags are for the C compiler; give nvcc only the C
# ones through -Xcompiler.
get_target_property(_oscar_opts oscar COMPILE_OPTIONS)
if(_oscar_opts)
  set(_oscar_new)
  foreach(o ${_oscar_opts})
    if(o MATCHES "^-W")
      list(APPEND _oscar_new "$<$<COMPILE_LANGUAGE:C>:${o}>")
    else()
      list(APPEND _oscar_new "${o}")
    endif()
  endforeach()
  set_property(TARGET oscar PROPERTY COMPILE_OPTIONS ${_oscar_new})
endif()
target_compile_options(oscar PRIVATE $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall>)
