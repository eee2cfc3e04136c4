#!/usr/bin/env bash
# `cmake --install` puts the header, the library, oscar.pc and the CMake
# package in a prefix; a tiny consumer then builds against it both with
# find_package(oscar) and with pkg-config, and runs. usage: cli_install.sh
# OSCAR_BINARY BUILD_DIR. Skips (77) for a sanitizer build (an unsanitised
# consumer cannot load it) or without pkg-config.
set -u
build="$(cd "$(dirname "$1")" && pwd)"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
if nm -D "$build/liboscar.so" 2>/dev/null | grep -q __asan_; then echo "SKIP: sanitizer build"; exit 77; fi
command -v pkg-config >/dev/null 2>&1 || { echo "SKIP: pkg-config not found"; exit 77; }
fail=0
cmake --install "$build" --prefix "$tmp/prefix" >"$tmp/install.log" 2>&1 || { echo "FAIL: cmake --install"; cat "$tmp/install.log"; exit 1; }
for f in include/oscar.h lib*/liboscar.so lib*/pkgconfig/oscar.pc lib*/cmake/oscar/oscarConfig.cmake bin/oscar; do
  ls "$tmp"/prefix/$f >/dev/null 2>&1 || { echo "FAIL: $f not installed"; fail=1; }
done
mkdir -p "$tmp/consumer"
cat > "$tmp/consumer/main.c" <<'C'
#include <oscar.h>
#include <stdio.h>
int main(void) {
    oscar_config c = oscar_config_default();
    oscar_cache *cache = NULL;
    char err[256];
    if (oscar_cache_create(&c, &cache, err, sizeof err) != OSCAR_OK) { printf("create: %s\n", err); return 1; }
    int32_t id;
    int ok = oscar_seq_add(cache, &id) == OSCAR_OK;
    oscar_cache_destroy(cache);
    printf("oscar %s %s\n", oscar_version(), ok ? "ok" : "failed");
    return ok ? 0 : 1;
}
C
cat > "$tmp/consumer/CMakeLists.txt" <<'C'
cmake_minimum_required(VERSION 3.18)
project(consumer C)
find_package(oscar 0.2 REQUIRED)
add_executable(consumer main.c)
target_link_libraries(consumer PRIVATE oscar::oscar)
C
libdir=$(ls -d "$tmp"/prefix/lib*/ | head -1)
if cmake -S "$tmp/consumer" -B "$tmp/consumer/build" -DCMAKE_PREFIX_PATH="$tmp/prefix" >"$tmp/c.log" 2>&1 &&
   cmake --build "$tmp/consumer/build" >>"$tmp/c.log" 2>&1 &&
   LD_LIBRARY_PATH="$libdir" "$tmp/consumer/build/consumer" | grep -q " ok$"; then
  echo "find_package(oscar): builds and runs"
else
  echo "FAIL: find_package consumer"; cat "$tmp/c.log"; fail=1
fi
if PKG_CONFIG_PATH="$libdir/pkgconfig" gcc "$tmp/consumer/main.c" -o "$tmp/consumer/pc" \
     $(PKG_CONFIG_PATH="$libdir/pkgconfig" pkg-config --cflags --libs oscar) 2>"$tmp/pc.log" &&
   LD_LIBRARY_PATH="$libdir" "$tmp/consumer/pc" | grep -q " ok$"; then
  echo "pkg-config oscar: builds and runs"
else
  echo "FAIL: pkg-config consumer"; cat "$tmp/pc.log"; fail=1
fi
[ $fail -eq 0 ] && echo "1 passed, 0 failed" || echo "0 passed, 1 failed"
exit $fail
