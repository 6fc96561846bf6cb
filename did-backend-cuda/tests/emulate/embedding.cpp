// The embedding backward (kernels/elementwise.cu) under the CPU emulation of emu.h: rows grouped
// by id as the backend groups them (did_backend_cuda::rows_by_id), blocks per id, against the
// CPU backend's loop (each row added to its id's row, in row order, in f32). Equal bit for bit:
// in f32 the additions are the same ones in the same order; in bf16 both round once at the end.
//
// Built twice (f32 and bf16 storage) and run by tests/emulated_kernels.rs.
#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/elementwise.cu"

int main() {
    std::mt19937 rng(5);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    int failures = 0;
    // (rows, table rows, channels, threads): channels below, between and above the thread count;
    // a table of one row puts every row in one group (the unrolled loop and its tail).
    // 100 rows of one id: three rounds of 32 and a tail.
    const int cases[][4] = {{50, 7, 40, 64}, {300, 40, 100, 64}, {37, 1, 3, 32}, {1, 5, 130, 64}, {100, 1, 257, 64}};
    for (const auto& c : cases) {
        const int rows = c[0], table = c[1], channels = c[2], threads = c[3];
        std::vector<unsigned> ids(rows);
        // One frequent id (a [MASK]), the rest uniform.
        for (auto& id : ids) id = (rng() % 3 == 0) ? 0u : (unsigned)(rng() % table);
        std::vector<store_t> dout(rows * channels), dtable(table * channels);
        for (auto& x : dout) x = to_store(normal(rng));
        for (auto& x : dtable) x = to_store(normal(rng));

        // The CPU backend's loop, accumulating in f32 per element and storing once.
        std::vector<float> acc(table * channels);
        for (int i = 0; i < table * channels; ++i) acc[i] = ld(dtable.data(), i);
        for (int r = 0; r < rows; ++r)
            for (int ch = 0; ch < channels; ++ch) acc[ids[r] * channels + ch] += ld(dout.data(), (i64)r * channels + ch);
        std::vector<store_t> want(table * channels);
        for (int i = 0; i < table * channels; ++i) want[i] = to_store(acc[i]);

        // Rows grouped by id, increasing within a group, groups by increasing id.
        std::vector<unsigned> order(rows);
        std::iota(order.begin(), order.end(), 0u);
        std::stable_sort(order.begin(), order.end(), [&](unsigned a, unsigned b) { return ids[a] < ids[b]; });
        std::vector<unsigned> start, group_ids;
        for (int k = 0; k < rows; ++k) {
            if (k == 0 || ids[order[k]] != ids[order[k - 1]]) {
                start.push_back(k);
                group_ids.push_back(ids[order[k]]);
            }
        }
        start.push_back(rows);
        std::vector<store_t> got = dtable;
        // As the backend launches it: two channels a thread.
        const unsigned channel_blocks = (unsigned)((channels + 2 * threads - 1) / (2 * threads));
        emu::launch(EmuDim3{(unsigned)group_ids.size(), channel_blocks, 1}, threads, [&] {
            embedding_backward(start.data(), group_ids.data(), order.data(), dout.data(), got.data(), channels);
        });
        bool same = std::memcmp(got.data(), want.data(), want.size() * sizeof(store_t)) == 0;
        std::printf("%s embedding_backward: %d rows, %zu ids, %d channels, %d threads\n", same ? "ok  " : "FAIL", rows,
                    group_ids.size(), channels, threads);
        failures += !same;
    }
    return failures ? 1 : 0;
}
