/* The `oscar` command-line tool: one binary, one subcommand per job. */
#include <stdio.h>
#include <string.h>

#include "commands.h"
#include "model_commands.h"
#include "oscar.h"

typedef struct command {
    const char *name;
    int (*run)(int argc, char **argv);
    const char *summary;
} command;

static const command commands[] = {
    {"eval-kv", oscar_cmd_eval_kv, "quantise K/V from .npy files and report reconstruction and attention error"},
    {"bench", oscar_cmd_bench, "CPU decode-attention and append throughput on a synthetic cache"},
    {"synth", oscar_cmd_synth, "write a seeded synthetic K/V/Q example with Token Norm Imbalance"},
    /* model commands (model/) */
    {"run", oscar_cmd_run, "generate text with a GGUF Llama model, KV cache in oscar"},
    {"ppl", oscar_cmd_ppl, "perplexity, KL and top-1 agreement of a quantised cache against 16-bit"},
    {"tni", oscar_cmd_tni, "key token-norm statistics and a PNG plot per layer"},
    {"niah", oscar_cmd_niah, "passkey retrieval (needle in a haystack) across lengths and depths"},
    {"bench-e2e", oscar_cmd_bench_e2e_device,
     "end-to-end decode/prefill tokens/s: --device cpu (a GGUF model) or cuda (Qwen3-8B shape)"},
};

static void usage(FILE *f) {
    fprintf(f,
            "oscar %s - a 2-bit KV cache with the OScaR method (arXiv 2605.19660: Canalized Rotation +\n"
            "Omni-Token Scaling, training- and calibration-free; not Together AI's OSCAR, arXiv 2605.17757)\n\n"
            "usage: oscar <command> [options]\n\ncommands:\n",
            oscar_version());
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\n`oscar <command> --help` describes a command's options.\n");
}

int main(int argc, char **argv) {
    if (argc < 2) {
        usage(stderr);
        return 2;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return 0;
    }
    if (!strcmp(argv[1], "--version")) {
        printf("oscar %s (format %d)\n", oscar_version(), OSCAR_FORMAT_VERSION);
        return 0;
    }
    for (size_t i = 0; i < sizeof commands / sizeof commands[0]; i++)
        if (!strcmp(argv[1], commands[i].name)) return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "oscar: unknown command '%s'\n\n", argv[1]);
    usage(stderr);
    return 2;
}
