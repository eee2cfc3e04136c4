/* Subcommands of the `oscar` tool. Each takes argv with argv[0] = its name
 * and returns the process exit status. */
#ifndef OSCAR_COMMANDS_H
#define OSCAR_COMMANDS_H
int oscar_cmd_eval_kv(int argc, char **argv);
int oscar_cmd_bench(int argc, char **argv);
int oscar_cmd_synth(int argc, char **argv);
#endif
