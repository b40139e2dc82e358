# qacc toolchain: AArch64 Linux (Raspberry Pi 3/4/5 class), Debian's aarch64-linux-gnu-gcc.
#
#   cmake -DCMAKE_TOOLCHAIN_FILE=toolchains/aarch64-linux.cmake -DQACC_CPU=cortex-a76 ...
#
# QACC_CPU (cache): cortex-a53 (default), cortex-a72, cortex-a76, cortex-a55; it becomes -mcpu and
# QEMU's -cpu (cortex-a55, which QEMU 7.2 does not model, runs as cortex-a76: the same ISA).
# Executables are linked statically, so qemu-aarch64 runs them without a target sysroot; CMake and
# CTest run them through CMAKE_CROSSCOMPILING_EMULATOR (qemu-aarch64 -cpu <QACC_CPU>).
# Debian packages: gcc-aarch64-linux-gnu (compiler), qemu-user (emulator).

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

set(QACC_CPU "cortex-a53" CACHE STRING "Target core (-mcpu and qemu -cpu)")
set_property(CACHE QACC_CPU PROPERTY STRINGS cortex-a53 cortex-a72 cortex-a76 cortex-a55)
if(NOT QACC_CPU MATCHES "^(cortex-a53|cortex-a72|cortex-a76|cortex-a55)$")
  message(FATAL_ERROR "qacc: QACC_CPU=${QACC_CPU} is not supported by aarch64-linux.cmake; use cortex-a53, cortex-a72, cortex-a76 or cortex-a55")
endif()
# try_compile projects re-read this file: hand them the same core.
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES QACC_CPU)

set(CMAKE_C_COMPILER aarch64-linux-gnu-gcc)
set(CMAKE_CXX_COMPILER aarch64-linux-gnu-g++)
set(CMAKE_C_FLAGS_INIT "-mcpu=${QACC_CPU}")
set(CMAKE_CXX_FLAGS_INIT "-mcpu=${QACC_CPU}")
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")

find_program(QACC_QEMU_AARCH64 qemu-aarch64)
if(NOT QACC_QEMU_AARCH64)
  set(QACC_QEMU_AARCH64 qemu-aarch64)
endif()
set(QACC_QEMU_CPU "${QACC_CPU}")
if(QACC_CPU STREQUAL "cortex-a55")
  set(QACC_QEMU_CPU cortex-a76)
endif()
set(CMAKE_CROSSCOMPILING_EMULATOR "${QACC_QEMU_AARCH64};-cpu;${QACC_QEMU_CPU}")

set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
set(CMAKE_FIND_ROOT_PATH /usr/aarch64-linux-gnu)
