// SIGSEGV handler for the GPU machine, which has no gdb: LD_PRELOAD it and a crash prints the
// native backtrace (scripts/gpu_check.sh does so for the tests).
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
static void handler(int sig) {
  void* frames[64];
  int n = backtrace(frames, 64);
  write(2, "SEGV backtrace:\n", 16);
  backtrace_symbols_fd(frames, n, 2);
  _exit(139);
}
__attribute__((constructor)) static void install(void) { signal(SIGSEGV, handler); }
