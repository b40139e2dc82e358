# qacc toolchain: ARMv7-A Linux, hard float with NEON (Raspberry Pi 2 and many boards),
# Debian's arm-linux-gnueabihf-gcc.
#
#   cmake -DCMAKE_TOOLCHAIN_FILE=toolchains/armhf-linux.cmake ...
#
# QACC_CPU (cache): cortex-a7 (default); it becomes -mcpu and QEMU's -cpu. Flags:
# -mfpu=neon-vfpv4 -mfloat-abi=hard (Debian's compiler emits Thumb-2 by default). Executables are
# linked statically, so qemu-arm runs them without a target sysroot; CMake and CTest run them
# through CMAKE_CROSSCOMPILING_EMULATOR (qemu-arm -cpu <QACC_CPU>).
# Debian packages: gcc-arm-linux-gnueabihf (compiler), qemu-user (emulator).

set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR arm)

set(QACC_CPU "cortex-a7" CACHE STRING "Target core (-mcpu and qemu -cpu)")
set_property(CACHE QACC_CPU PROPERTY STRINGS cortex-a7)
if(NOT QACC_CPU MATCHES "^(cortex-a7)$")
  message(FATAL_ERROR "qacc: QACC_CPU=${QACC_CPU} is not supported by armhf-linux.cmake; use cortex-a7")
endif()
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES QACC_CPU)

set(CMAKE_C_COMPILER arm-linux-gnueabihf-gcc)
set(CMAKE_CXX_COMPILER arm-linux-gnueabihf-g++)
set(CMAKE_C_FLAGS_INIT "-mcpu=${QACC_CPU} -mfpu=neon-vfpv4 -mfloat-abi=hard")
set(CMAKE_CXX_FLAGS_INIT "-mcpu=${QACC_CPU} -mfpu=neon-vfpv4 -mfloat-abi=hard")
set(CMAKE_EXE_LINKER_FLAGS_INIT "-static")

find_program(QACC_QEMU_ARM qemu-arm)
if(NOT QACC_QEMU_ARM)
  set(QACC_QEMU_ARM qemu-arm)
endif()
set(CMAKE_CROSSCOMPILING_EMULATOR "${QACC_QEMU_ARM};-cpu;${QACC_CPU}")

set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
set(CMAKE_FIND_ROOT_PATH /usr/arm-linux-gnueabihf)
