# qacc toolchain: bare-metal Cortex-M, Debian's arm-none-eabi-gcc + newlib, run on QEMU's MPS2/MPS3
# boards with semihosting.
#
#   cmake -DCMAKE_TOOLCHAIN_FILE=toolchains/cortex-m.cmake -DQACC_CPU=cortex-m55 ...
#
# QACC_CPU (cache)   board (QEMU -M)   flags
#   cortex-m4        mps2-an386        -mcpu=cortex-m4 -mthumb -mfpu=fpv4-sp-d16 -mfloat-abi=hard
#   cortex-m7        mps2-an500        -mcpu=cortex-m7 -mthumb -mfpu=fpv5-d16 -mfloat-abi=hard
#   cortex-m55       mps3-an547        -mcpu=cortex-m55 -mthumb -mfloat-abi=hard (MVE with float)
#
# Every executable gets runtime_c/cortexm/startup.c (vector table at 0, FPU/MVE enable, newlib
# crt0) and runtime_c/cortexm/qacc_cycles.c (DWT cycle counter) compiled into its link step, the
# board's linker script (runtime_c/cortexm/<board>.ld) and --specs=rdimon.specs (printf, files
# and exit over semihosting). runtime_c/cortexm is on the include path (qacc_cycles.h).
#
# CMAKE_CROSSCOMPILING_EMULATOR is "qemu-system-arm -M <board> -nographic -semihosting-config
# enable=on,target=native -kernel"; CMake/CTest append the executable. Program arguments cannot
# follow -kernel: give them with "-semihosting-config ...,arg=prog,arg=..." (codegen/targets/qemu.py does).
# Debian packages: gcc-arm-none-eabi and libnewlib-arm-none-eabi (compiler, C library),
# qemu-system-arm (emulator).

set(CMAKE_SYSTEM_NAME Generic)
set(CMAKE_SYSTEM_PROCESSOR arm)

set(QACC_CPU "cortex-m4" CACHE STRING "Target core (-mcpu); selects the QEMU board")
set_property(CACHE QACC_CPU PROPERTY STRINGS cortex-m4 cortex-m7 cortex-m55)
if(QACC_CPU STREQUAL "cortex-m4")
  set(_qacc_board mps2-an386)
  set(_qacc_fpu "-mfpu=fpv4-sp-d16 -mfloat-abi=hard")
elseif(QACC_CPU STREQUAL "cortex-m7")
  set(_qacc_board mps2-an500)
  set(_qacc_fpu "-mfpu=fpv5-d16 -mfloat-abi=hard")
elseif(QACC_CPU STREQUAL "cortex-m55")
  set(_qacc_board mps3-an547)
  # -mcpu=cortex-m55 implies +mve.fp (and the FP extension); -mfpu=auto is GCC's default.
  set(_qacc_fpu "-mfloat-abi=hard")
else()
  message(FATAL_ERROR "qacc: QACC_CPU=${QACC_CPU} is not supported by cortex-m.cmake; use cortex-m4, cortex-m7 or cortex-m55")
endif()
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES QACC_CPU)
set(QACC_BOARD "${_qacc_board}" CACHE INTERNAL "QEMU machine for QACC_CPU")

get_filename_component(QACC_CORTEXM_DIR "${CMAKE_CURRENT_LIST_DIR}/../runtime_c/cortexm" ABSOLUTE)

set(CMAKE_C_COMPILER arm-none-eabi-gcc)
set(CMAKE_CXX_COMPILER arm-none-eabi-g++)
set(CMAKE_ASM_COMPILER arm-none-eabi-gcc)
set(_qacc_cflags "-mcpu=${QACC_CPU} -mthumb ${_qacc_fpu}")
set(CMAKE_C_FLAGS_INIT "${_qacc_cflags} -I${QACC_CORTEXM_DIR}")
set(CMAKE_CXX_FLAGS_INIT "${_qacc_cflags} -I${QACC_CORTEXM_DIR}")
set(CMAKE_ASM_FLAGS_INIT "${_qacc_cflags}")
set(CMAKE_EXE_LINKER_FLAGS_INIT
    "--specs=rdimon.specs -L${QACC_CORTEXM_DIR} -T${QACC_CORTEXM_DIR}/${_qacc_board}.ld")

# The startup code and the cycle counter are compiled by the compiler driver inside the link
# step of every C executable, so projects need not know about them.
set(CMAKE_C_LINK_EXECUTABLE
    "<CMAKE_C_COMPILER> <FLAGS> <CMAKE_C_LINK_FLAGS> <LINK_FLAGS> ${QACC_CORTEXM_DIR}/startup.c ${QACC_CORTEXM_DIR}/qacc_cycles.c <OBJECTS> -o <TARGET> <LINK_LIBRARIES>")

find_program(QACC_QEMU_SYSTEM_ARM qemu-system-arm)
if(NOT QACC_QEMU_SYSTEM_ARM)
  set(QACC_QEMU_SYSTEM_ARM qemu-system-arm)
endif()
set(CMAKE_CROSSCOMPILING_EMULATOR
    "${QACC_QEMU_SYSTEM_ARM};-M;${_qacc_board};-nographic;-semihosting-config;enable=on,target=native;-kernel")

set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
