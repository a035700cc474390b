// Subcommands of the `specontext` CLI. Each returns the process exit code.
#pragma once

namespace specontext {

int GenerateMain(int argc, char** argv);
int BenchMain(int argc, char** argv);
int BenchSparseMain(int argc, char** argv);  // bench --sparse (dispatched by BenchMain)
int PruneMain(int argc, char** argv);
int ScoreMain(int argc, char** argv);
int EvalMain(int argc, char** argv);
int TokenizeMain(int argc, char** argv);

}  // namespace specontext
