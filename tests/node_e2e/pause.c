/* The pod sandbox's process, as Kubernetes' pause image runs it: hold the pod's namespaces
 * open, reap children (PID 1 of a shared PID namespace), exit cleanly on SIGINT/SIGTERM.
 * Built by tests/node_e2e/node.rs with `cc -static` (glibc's libc.a, from libc6-dev) into a
 * one-layer OCI image, since no registry is reachable from CI. */
#include <signal.h>
#include <stddef.h>
#include <sys/wait.h>
#include <unistd.h>

static void quit(int sig) {
  (void)sig;
  _exit(0);
}

static void reap(int sig) {
  (void)sig;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
}

int main(void) {
  struct sigaction q = {0}, r = {0};
  q.sa_handler = quit;
  r.sa_handler = reap;
  r.sa_flags = SA_NOCLDSTOP;
  if (sigaction(SIGINT, &q, NULL) < 0 || sigaction(SIGTERM, &q, NULL) < 0 ||
      sigaction(SIGCHLD, &r, NULL) < 0) {
    return 1;
  }
  for (;;) {
    pause();
  }
}
