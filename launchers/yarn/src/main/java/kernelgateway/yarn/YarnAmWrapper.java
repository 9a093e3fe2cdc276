package kernelgateway.yarn;

import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.nio.charset.StandardCharsets;
import java.util.ArrayDeque;
import java.util.ArrayList;
import java.util.Arrays;
import java.util.Deque;
import java.util.List;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicBoolean;
import org.apache.hadoop.yarn.api.protocolrecords.AllocateResponse;
import org.apache.hadoop.yarn.api.records.AMCommand;
import org.apache.hadoop.yarn.api.records.FinalApplicationStatus;
import org.apache.hadoop.yarn.client.api.AMRMClient;
import org.apache.hadoop.yarn.conf.YarnConfiguration;

/**
 * The ApplicationMaster of a kernel's YARN application: registers with the ResourceManager (so the
 * application goes ACCEPTED -> RUNNING and the AM liveness monitor does not expire it), runs the
 * launcher command given after {@code --} as a child process and heartbeats while it lives.
 *
 * <p>When the child exits the AM unregisters: SUCCEEDED on exit 0, otherwise FAILED with the exit
 * code and the tail of the child's stderr in the diagnostics (the application then reads
 * FINISHED/FAILED). It exits with the child's exit code.
 *
 * <p>The child runs in its own session/process group ({@code setsid}) under a tiny shell watchdog that
 * holds the read end of a pipe from this JVM: when the AM dies, even by SIGKILL, the pipe closes and the
 * watchdog SIGKILLs the child's whole group. On SIGTERM (what the NodeManager sends when the
 * application is killed) the AM sends SIGTERM to the child's group, waits {@code --kill-grace-ms},
 * then SIGKILLs it. The NodeManager's own kill only reaches the AM's group, so nothing else would.
 *
 * <p>Usage: {@code java -cp AM_JAR:HADOOP_CLASSPATH kernelgateway.yarn.YarnAmWrapper [options] -- cmd [args...]}
 * <br>Options: {@code --heartbeat-ms N} (1000), {@code --kill-grace-ms N} (200; the NodeManager SIGKILLs
 * the AM 250 ms after its SIGTERM by default), {@code --stderr-tail-lines N} (20).
 * Exit 2 (and no registration) on a usage error.
 */
public final class YarnAmWrapper {
  /**
   * Runs "$@" in the foreground with normal signal dispositions (a background job of a non-interactive
   * shell would start with SIGINT ignored) and, in the background, a watcher that SIGKILLs the whole
   * process group ($$ is its leader) once its stdin, a pipe from this JVM, closes. The shell catches
   * TERM/INT/HUP only to outlive the command, so that the grace period below waits for the command.
   */
  private static final String WATCHDOG =
      "exec 3<&0 0</dev/null; { trap '' TERM INT HUP; read -r x <&3; kill -KILL -$$; } & w=$!; exec 3<&-; "
          + "trap : TERM INT HUP; \"$@\"; rc=$?; kill -KILL $w 2>/dev/null; exit $rc";

  private long heartbeatMs = 1000;
  private long killGraceMs = 200;
  private int tailLines = 20;
  private List<String> command = new ArrayList<>();

  private final Deque<String> stderrTail = new ArrayDeque<>();
  private final AtomicBoolean terminating = new AtomicBoolean(false);
  private volatile Process child;
  private volatile boolean ownGroup;

  public static void main(String[] args) throws Exception {
    YarnAmWrapper am = new YarnAmWrapper();
    String error = am.parse(args);
    if (error != null) {
      System.err.println("YarnAmWrapper: " + error);
      System.err.println("usage: YarnAmWrapper [--heartbeat-ms N] [--kill-grace-ms N] [--stderr-tail-lines N] -- cmd [args...]");
      System.exit(2);
    }
    System.exit(am.run());
  }

  /** Reads the options; returns an error message, or null when the arguments are usable. */
  String parse(String[] args) {
    int i = 0;
    for (; i < args.length && !args[i].equals("--"); i++) {
      String opt = args[i];
      if (i + 1 >= args.length || args[i + 1].equals("--")) return "option " + opt + " needs a value";
      long value;
      try {
        value = Long.parseLong(args[++i]);
      } catch (NumberFormatException e) {
        return "option " + opt + " needs a number, got '" + args[i] + "'";
      }
      if (value < 0) return "option " + opt + " must not be negative";
      switch (opt) {
        case "--heartbeat-ms": heartbeatMs = Math.max(value, 50); break;
        case "--kill-grace-ms": killGraceMs = value; break;
        case "--stderr-tail-lines": tailLines = (int) Math.min(value, 1000); break;
        default: return "unknown option " + opt;
      }
    }
    if (i >= args.length) return "missing '--' before the command";
    command = new ArrayList<>(Arrays.asList(args).subList(i + 1, args.length));
    return command.isEmpty() ? "no command after '--'" : null;
  }

  int run() throws Exception {
    AMRMClient<AMRMClient.ContainerRequest> rm = AMRMClient.createAMRMClient();
    rm.init(new YarnConfiguration());
    rm.start();
    String host = System.getenv().getOrDefault("NM_HOST", "localhost");
    rm.registerApplicationMaster(host, -1, "");
    log("registered on " + host + ", running " + command);

    try {
      child = startChild();
    } catch (IOException e) {
      log("cannot start the command: " + e);
      unregister(rm, FinalApplicationStatus.FAILED, "could not start " + command + ": " + e.getMessage());
      return 127;
    }
    Thread pump = pumpStderr(child.getErrorStream());
    Runtime.getRuntime().addShutdownHook(new Thread(this::onTerminate, "yarn-am-terminate"));

    String lostRm = null;
    while (child.isAlive() && lostRm == null) {
      try {
        AllocateResponse response = rm.allocate(0.5f);  // the heartbeat
        AMCommand cmd = response.getAMCommand();
        if (cmd == AMCommand.AM_SHUTDOWN || cmd == AMCommand.AM_RESYNC) lostRm = "ResourceManager sent " + cmd;
      } catch (Exception e) {  // the attempt was killed or the RM is gone: nobody to report to
        lostRm = "heartbeat failed: " + e;
      }
      child.waitFor(heartbeatMs, TimeUnit.MILLISECONDS);
    }
    if (lostRm != null) {
      log(lostRm + "; stopping the command");
      killChild();
      rm.stop();
      return 1;
    }
    int rc = child.waitFor();
    pump.join(2000);  // the rest of stderr, for the diagnostics
    if (terminating.get()) return rc;  // SIGTERM: the application is being killed, no report
    if (rc == 0) {
      unregister(rm, FinalApplicationStatus.SUCCEEDED, "command exited with code 0");
    } else {
      unregister(rm, FinalApplicationStatus.FAILED, "command exited with code " + rc + describe(rc) + tail());
    }
    log("command exited with code " + rc);
    return rc;
  }

  private Process startChild() throws IOException {
    List<String> argv = new ArrayList<>();
    String setsid = which("setsid");
    ownGroup = setsid != null;
    if (ownGroup) {  // setsid execs in place (we are not a group leader), so the child's pid is its pgid
      argv.addAll(Arrays.asList(setsid, "/bin/sh", "-c", WATCHDOG, "yarn-am-child"));
    }
    argv.addAll(command);
    ProcessBuilder pb = new ProcessBuilder(argv);
    pb.redirectOutput(ProcessBuilder.Redirect.INHERIT);
    // stdin stays a pipe from us: the watchdog's lifeline. stderr is pumped through us for the tail.
    return pb.start();
  }

  /** Copies the command's stderr to ours as it comes, remembering its last lines (decoded whole, UTF-8). */
  private Thread pumpStderr(InputStream in) {
    Thread t = new Thread(() -> {
      byte[] buf = new byte[8192];
      ByteArrayOutputStream line = new ByteArrayOutputStream();
      try {
        int n;
        while ((n = in.read(buf)) > 0) {
          System.err.write(buf, 0, n);
          System.err.flush();
          for (int i = 0; i < n; i++) {
            if (buf[i] == '\n') {
              remember(line.toString(StandardCharsets.UTF_8));
              line.reset();
            } else if (line.size() < 2000) {
              line.write(buf[i]);
            }
          }
        }
      } catch (IOException ignored) {
        // the command is gone
      }
      if (line.size() > 0) remember(line.toString(StandardCharsets.UTF_8));
    }, "yarn-am-stderr");
    t.setDaemon(true);
    t.start();
    return t;
  }

  private synchronized void remember(String line) {
    stderrTail.addLast(line);
    while (stderrTail.size() > tailLines) stderrTail.removeFirst();
  }

  private synchronized String tail() {
    if (stderrTail.isEmpty()) return "";
    return "\nlast lines of its stderr:\n" + String.join("\n", stderrTail);
  }

  private static String describe(int rc) {
    return rc > 128 && rc < 160 ? " (killed by signal " + (rc - 128) + ")" : "";
  }

  /** Shutdown hook (SIGTERM, SIGINT, System.exit): make sure the command's whole group is gone. */
  private void onTerminate() {
    Process p = child;
    if (p == null || !p.isAlive()) return;
    terminating.set(true);
    log("terminating: stopping the command");
    killChild();
  }

  private void killChild() {
    Process p = child;
    if (p == null) return;
    signalGroup(p, "TERM");
    try {
      p.waitFor(killGraceMs, TimeUnit.MILLISECONDS);
    } catch (InterruptedException e) {
      Thread.currentThread().interrupt();
    }
    signalGroup(p, "KILL");  // also reaches children that outlived the command's leader
    try {
      p.getOutputStream().close();  // the watchdog's lifeline, in case kill(1) could not run
    } catch (IOException ignored) {
      // already closed
    }
  }

  private void signalGroup(Process p, String sig) {
    if (ownGroup) {
      try {
        new ProcessBuilder("kill", "-" + sig, "--", "-" + p.pid()).redirectErrorStream(true)
            .redirectOutput(ProcessBuilder.Redirect.DISCARD).start().waitFor(2, TimeUnit.SECONDS);
        return;
      } catch (IOException e) {
        log("kill -" + sig + " failed: " + e);
      } catch (InterruptedException e) {
        Thread.currentThread().interrupt();
      }
    }
    // no own group (no setsid here): the descendants, then the child
    p.toHandle().descendants().forEach(h -> { if (sig.equals("KILL")) h.destroyForcibly(); else h.destroy(); });
    if (sig.equals("KILL")) p.destroyForcibly(); else p.destroy();
  }

  private static void unregister(AMRMClient<?> rm, FinalApplicationStatus status, String diagnostics) {
    try {
      rm.unregisterApplicationMaster(status, diagnostics, "");
    } catch (Exception e) {
      log("unregister failed: " + e);
    }
    rm.stop();
  }

  private static String which(String name) {
    for (String dir : System.getenv().getOrDefault("PATH", "/usr/bin:/bin").split(":")) {
      java.io.File f = new java.io.File(dir, name);
      if (f.canExecute()) return f.getPath();
    }
    for (String dir : new String[] {"/usr/bin", "/bin", "/usr/sbin", "/sbin"}) {
      java.io.File f = new java.io.File(dir, name);
      if (f.canExecute()) return f.getPath();
    }
    return null;
  }

  private static void log(String message) {
    System.err.println("YarnAmWrapper: " + message);
    System.err.flush();
  }
}
