/*
 * model_commands.h - the `oscar run`, `oscar ppl` and `oscar tni`
 * subcommands (a GGUF Llama runner whose KV cache lives in oscar).
 * argv[0] is the subcommand name. They return a process exit status.
 */
#ifndef OSCAR_MODEL_COMMANDS_H
#define OSCAR_MODEL_COMMANDS_H

int oscar_cmd_run(int argc, char **argv);
int oscar_cmd_ppl(int argc, char **argv);
int oscar_cmd_tni(int argc, char **argv);
int oscar_cmd_niah(int argc, char **argv); /* passkey retrieval (model/niah.c) */
/* The end-to-end GPU decode benchmark (model/gpu/e2e.cu; a stub that
 * explains itself when the CUDA backend is not built). */
int oscar_cmd_bench_e2e(int argc, char **argv);
/* `oscar bench-e2e --device cpu|cuda` (model/e2e_cpu.c): the CPU runner on a
 * GGUF model, or the GPU benchmark above. */
int oscar_cmd_bench_e2e_device(int argc, char **argv);
/* A cache configuration as the commands print it ("oscar-2", "oscar K3/V2
 * min-exact 64 sinks 32", "none (16-bit)"); returns buf. */
struct oscar_config;
const char *oscar_kv_label(const struct oscar_config *cfg, char *buf, size_t n);

#endif
