# The `bundle` target: <build>/bundle/{bin,lib} holding every executable of the project (tests,
# tools, benchmarks) and the non-system shared libraries they load, plus run-gpu-tests.sh, so the
# folder runs as it is on the GPU machine (Ubuntu 24.04, its own driver and cuBLAS; docs/gpu.md).
#
# Included at the end of the top-level CMakeLists.txt (configure mode): gives every executable the
# RPATH $ORIGIN/../lib (as DT_RPATH, which unlike DT_RUNPATH also serves the libraries' own
# dependencies) and adds the target. Run with -P (script mode) by that target: copies and strips
# the binaries, copies their libraries found by ldd, writes the run script and checks the size.

# Libraries the GPU machine provides itself: glibc, the GCC runtime, the driver and cuBLAS.
set(SPC_BUNDLE_SYSTEM_LIBS
  "^linux-vdso" "^libc\\.so" "^libm\\.so" "^libstdc\\+\\+\\.so" "^libgcc_s\\.so" "^ld-linux"
  "^libpthread\\.so" "^libdl\\.so" "^librt\\.so" "^libresolv\\.so" "^libcuda\\.so" "^libcublas"
  "^libnvidia")
set(SPC_BUNDLE_MAX_MB 52)  # a device call carries 64 MiB with the ~10 MiB working tree
# Files over 256 KiB travel xz-compressed (about 4x on these binaries, whose CUDA kernels and static
# runtime make each GPU binary ~3 MB); env.sh unpacks them once on the GPU machine.
set(SPC_BUNDLE_COMPRESS_BYTES 262144)

if(NOT CMAKE_SCRIPT_MODE_FILE)
  function(spc_collect_executables dir out)
    get_property(targets DIRECTORY "${dir}" PROPERTY BUILDSYSTEM_TARGETS)
    set(found "")
    foreach(t ${targets})
      get_target_property(type ${t} TYPE)
      if(type STREQUAL "EXECUTABLE")
        list(APPEND found ${t})
      endif()
    endforeach()
    get_property(subdirs DIRECTORY "${dir}" PROPERTY SUBDIRECTORIES)
    foreach(sub ${subdirs})
      spc_collect_executables("${sub}" sub_found)
      list(APPEND found ${sub_found})
    endforeach()
    set(${out} ${found} PARENT_SCOPE)
  endfunction()

  spc_collect_executables("${PROJECT_SOURCE_DIR}" spc_bundle_exes)
  # Executables left out of the bundle (e.g. benchmarks a device call does not need), to stay under the
  # carry limit while every GPU binary links the kernels statically.
  set(SPECONTEXT_BUNDLE_SKIP "" CACHE STRING "executables the bundle leaves out (list of target names)")
  if(SPECONTEXT_BUNDLE_SKIP)
    list(REMOVE_ITEM spc_bundle_exes ${SPECONTEXT_BUNDLE_SKIP})
  endif()
  set(spc_manifest "")
  foreach(t ${spc_bundle_exes})
    set_property(TARGET ${t} APPEND PROPERTY BUILD_RPATH "$ORIGIN/../lib")
    set_property(TARGET ${t} APPEND PROPERTY LINK_OPTIONS "LINKER:--disable-new-dtags")
    string(APPEND spc_manifest "$<TARGET_FILE:${t}>\n")
  endforeach()
  file(GENERATE OUTPUT "${PROJECT_BINARY_DIR}/bundle_manifest.txt" CONTENT "${spc_manifest}")
  list(LENGTH spc_bundle_exes spc_n)
  message(STATUS "bundle: ${spc_n} executables")
  add_custom_target(bundle
    COMMAND ${CMAKE_COMMAND}
      -DMANIFEST=${PROJECT_BINARY_DIR}/bundle_manifest.txt
      -DBUNDLE_DIR=${PROJECT_BINARY_DIR}/bundle
      -DDATA_DIR=${SPECONTEXT_DATA_DIR}
      -DMODEL_DIR=${PROJECT_SOURCE_DIR}/models
      -DTOKENIZER_DIR=${PROJECT_BINARY_DIR}/test_data/tokenizers
      -DBUILD_DIR=${PROJECT_BINARY_DIR}
      -DSTRIP=${CMAKE_STRIP}
      -DSCRIPTS_DIR=${PROJECT_SOURCE_DIR}/cmake
      -P ${CMAKE_CURRENT_LIST_FILE}
    DEPENDS ${spc_bundle_exes}
    COMMENT "Writing the relocatable bundle to ${PROJECT_BINARY_DIR}/bundle"
    VERBATIM)
  return()
endif()

# ---- script mode ----------------------------------------------------------------------------
function(spc_bundle_compress path)
  file(SIZE "${path}" size)
  if(size GREATER SPC_BUNDLE_COMPRESS_BYTES)
    execute_process(COMMAND xz -T0 -6 -f "${path}" RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR "xz ${path} failed")
    endif()
  endif()
endfunction()

file(REMOVE_RECURSE "${BUNDLE_DIR}")
file(MAKE_DIRECTORY "${BUNDLE_DIR}/bin" "${BUNDLE_DIR}/lib")
file(STRINGS "${MANIFEST}" exes)
set(libs "")
foreach(exe ${exes})
  get_filename_component(name "${exe}" NAME)
  file(COPY "${exe}" DESTINATION "${BUNDLE_DIR}/bin")
  if(STRIP)
    execute_process(COMMAND "${STRIP}" --strip-unneeded "${BUNDLE_DIR}/bin/${name}")
  endif()
  spc_bundle_compress("${BUNDLE_DIR}/bin/${name}")
  execute_process(COMMAND ldd "${exe}" OUTPUT_VARIABLE ldd_out RESULT_VARIABLE rc)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "ldd ${exe} failed")
  endif()
  string(REPLACE "\n" ";" lines "${ldd_out}")
  foreach(line ${lines})
    if(line MATCHES "^[ \t]*([^ \t]+) => not found")
      message(FATAL_ERROR "${name}: ${CMAKE_MATCH_1} not found by ldd")
    endif()
    if(NOT line MATCHES "^[ \t]*([^ \t]+) => ([^ \t]+) \\(")
      continue()
    endif()
    set(soname "${CMAKE_MATCH_1}")
    set(path "${CMAKE_MATCH_2}")
    set(system OFF)
    foreach(re ${SPC_BUNDLE_SYSTEM_LIBS})
      if(soname MATCHES "${re}")
        set(system ON)
      endif()
    endforeach()
    if(NOT system)
      list(APPEND libs "${soname}|${path}")
    endif()
  endforeach()
endforeach()
list(REMOVE_DUPLICATES libs)
foreach(entry ${libs})
  string(REPLACE "|" ";" parts "${entry}")
  list(GET parts 0 soname)
  list(GET parts 1 path)
  # Copies the file a symlink chain ends at, under the name the loader asks for.
  get_filename_component(real "${path}" REALPATH)
  set(dst "${BUNDLE_DIR}/lib/${soname}")
  configure_file("${real}" "${dst}" COPYONLY)
  if(STRIP)
    execute_process(COMMAND "${STRIP}" --strip-unneeded "${dst}")
  endif()
  spc_bundle_compress("${dst}")  # OpenBLAS with all its CPU kernels is 36 MB
endforeach()
# Test data travels too (small); the tokenizer archive is unpacked on the GPU machine.
get_filename_component(data_real "${DATA_DIR}" REALPATH)
file(COPY "${data_real}/" DESTINATION "${BUNDLE_DIR}/data")
file(COPY "${MODEL_DIR}/" DESTINATION "${BUNDLE_DIR}/models")
configure_file("${SCRIPTS_DIR}/bundle-env.sh.in" "${BUNDLE_DIR}/env.sh" @ONLY)
file(COPY "${SCRIPTS_DIR}/run-gpu-tests.sh" DESTINATION "${BUNDLE_DIR}"
     FILE_PERMISSIONS OWNER_READ OWNER_WRITE OWNER_EXECUTE GROUP_READ GROUP_EXECUTE WORLD_READ WORLD_EXECUTE)

file(GLOB_RECURSE all_files "${BUNDLE_DIR}/*")
set(total 0)
foreach(f ${all_files})
  file(SIZE "${f}" s)
  math(EXPR total "${total} + ${s}")
endforeach()
math(EXPR total_mb "${total} / 1048576")
list(LENGTH exes n_exes)
list(LENGTH libs n_libs)
message(STATUS "bundle: ${n_exes} executables, ${n_libs} libraries, ${total_mb} MiB in ${BUNDLE_DIR}")
if(total_mb GREATER_EQUAL SPC_BUNDLE_MAX_MB)
  message(FATAL_ERROR "bundle is ${total_mb} MiB, over the ${SPC_BUNDLE_MAX_MB} MiB the GPU machine accepts")
endif()
