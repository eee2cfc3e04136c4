# Thin wrapper around CMake. `make test` is the README's test command.
BUILD ?= build
JOBS ?= $(shell nproc 2>/dev/null || echo 2)
MAKEFLAGS += --no-print-directory
CMAKE_FLAGS ?=

.PHONY: all build test test-c test-asan test-python demo bench clean

all: build

build:
	cmake -S . -B $(BUILD) -DCMAKE_BUILD_TYPE=Release $(CMAKE_FLAGS) >/dev/null
	cmake --build $(BUILD) -j $(JOBS)

test-c: build
	cd $(BUILD) && ctest --output-on-failure -j $(JOBS)

test-asan:
	cmake -S . -B build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DOSCAR_SANITIZE=ON -DOSCAR_CUDA=OFF >/dev/null
	cmake --build build-asan -j $(JOBS)
	# The Python tests load liboscar.so into an unsanitised interpreter; they run in test-c.
	cd build-asan && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1 ctest --output-on-failure -j $(JOBS) -E 'cli_python'

test: test-c test-asan

demo: build
	./scripts/demo.sh

clean:
	rm -rf $(BUILD) build-asan
