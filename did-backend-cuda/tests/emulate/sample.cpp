// The token-drawing kernel (kernels/sample.cu) under the CPU emulation of emu.h, driven by
// tests/emulated_kernels.rs, which writes the logits and streams, reads what the kernel drew
// and checks it against did_core's draw_token.
//
//   sample IN OUT
// IN: u64 rows, u64 vocab, i64 mask_id, f64 top_p, i32 smallest_cover, i32 threads, then
//     rows × vocab f32 logits (exact in the storage type), then rows × 5 u32 stream words.
// OUT: rows × 2 u32 (token, certain), then rows × 3 f64 (nucleus, raw, max confidence).
// The kernel runs twice; the two results must be equal bit for bit (exit 1 otherwise).
#include <cstdint>
#include <cstdio>

#include "emu.h"
#include "../../kernels/common.cuh"
#include "../../kernels/sample.cu"

template <class T>
static bool read_all(std::FILE* f, T* data, size_t n) { return std::fread(data, sizeof(T), n, f) == n; }

int main(int argc, char** argv) {
    if (argc != 3) {
        std::fprintf(stderr, "usage: sample IN OUT\n");
        return 2;
    }
    std::FILE* in = std::fopen(argv[1], "rb");
    if (!in) return 2;
    uint64_t rows, vocab;
    int64_t mask_id;
    double top_p;
    int32_t smallest_cover, threads;
    if (!read_all(in, &rows, 1) || !read_all(in, &vocab, 1) || !read_all(in, &mask_id, 1) || !read_all(in, &top_p, 1) ||
        !read_all(in, &smallest_cover, 1) || !read_all(in, &threads, 1))
        return 2;
    std::vector<float> host(rows * vocab);
    std::vector<unsigned> specs(rows * 5);
    if (!read_all(in, host.data(), host.size()) || !read_all(in, specs.data(), specs.size())) return 2;
    std::fclose(in);
    std::vector<store_t> logits(host.size());
    for (size_t i = 0; i < host.size(); ++i) logits[i] = to_store(host[i]);

    std::vector<unsigned> ids[2];
    std::vector<double> confidence[2];
    for (int run = 0; run < 2; ++run) {
        ids[run].assign(rows * 2, 0xdeadbeefu);
        confidence[run].assign(rows * 3, -1.0);
        emu::launch(EmuDim3{(unsigned)rows, 1, 1}, (unsigned)threads, [&] {
            draw_tokens(logits.data(), (i64)vocab, mask_id, specs.data(), top_p, smallest_cover, ids[run].data(),
                        confidence[run].data());
        });
    }
    if (ids[0] != ids[1] || std::memcmp(confidence[0].data(), confidence[1].data(), rows * 3 * sizeof(double)) != 0) {
        std::printf("FAIL draw_tokens: two runs differ\n");
        return 1;
    }
    std::FILE* out = std::fopen(argv[2], "wb");
    if (!out) return 2;
    std::fwrite(ids[0].data(), sizeof(unsigned), ids[0].size(), out);
    std::fwrite(confidence[0].data(), sizeof(double), confidence[0].size(), out);
    std::fclose(out);
    std::printf("ok   draw_tokens: %llu rows of %llu, deterministic\n", (unsigned long long)rows, (unsigned long long)vocab);
    return 0;
}
