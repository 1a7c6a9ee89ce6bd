# Given to llama.cpp's CMake configure as CMAKE_PROJECT_INCLUDE by deploy/local/setup.sh, which
# builds with CMAKE_UNITY_BUILD (several sources per compiler run: each heavy header, nlohmann's
# json above all, is parsed once per batch rather than once per file; about half the CPU time).
# The one exception: mtmd's helper sources refuse to share a translation unit with mtmd's
# internals (#error), so they are compiled alone. Scheduled for the end of the top-level
# configuration, when mtmd's directory exists.
include_guard(GLOBAL)
cmake_language(DEFER DIRECTORY "${CMAKE_SOURCE_DIR}" CALL
    set_source_files_properties
        "${CMAKE_SOURCE_DIR}/tools/mtmd/mtmd-helper.cpp" "${CMAKE_SOURCE_DIR}/tools/mtmd/mtmd-helper-gen.cpp"
        DIRECTORY "${CMAKE_SOURCE_DIR}/tools/mtmd"
        PROPERTIES SKIP_UNITY_BUILD_INCLUSION ON)
