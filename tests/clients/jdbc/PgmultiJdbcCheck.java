// The PostgreSQL JDBC driver against pgmulti in transaction pooling (or PostgreSQL directly).
//
//     javac -cp postgresql.jar -d OUT PgmultiJdbcCheck.java
//     java -cp postgresql.jar:OUT PgmultiJdbcCheck JDBC_URL TABLE [SCENARIO]
//
// JDBC_URL should set prepareThreshold (the tests use 5): from that many executions on, a
// PreparedStatement is a named server-side statement, which a transaction pooler must carry
// from server to server. TABLE is an existing table (id int primary key, val text, grp text)
// that this program fills; its final contents are checked by the caller. SCENARIO is "main"
// (the default) or "aborted-transaction".
//
// Prints one line per check ("name: ok ...") and "ALL OK" at the end; on any mismatch prints
// "FAIL: ..." and exits 1.

import java.sql.BatchUpdateException;
import java.sql.Connection;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Set;
import java.util.TreeSet;
import java.util.concurrent.ConcurrentSkipListSet;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.Future;
import java.util.concurrent.TimeUnit;

import org.postgresql.PGStatement;

public final class PgmultiJdbcCheck {
    static final int AUTOCOMMIT_RUNS = 20;
    static final int THREADS = 4;
    static final int THREAD_ITERATIONS = 40;
    static final int BATCH_ROWS = 100;

    static final class Mismatch extends RuntimeException {
        Mismatch(String message) {
            super(message);
        }
    }

    private final String url;
    private final String table;
    private final String scenario;

    private PgmultiJdbcCheck(String url, String table, String scenario) {
        this.url = url;
        this.table = table;
        this.scenario = scenario;
    }

    public static void main(String[] args) {
        if (args.length < 2 || args.length > 3) {
            System.err.println("usage: PgmultiJdbcCheck JDBC_URL TABLE [main|aborted-transaction]");
            System.exit(2);
        }
        try {
            new PgmultiJdbcCheck(args[0], args[1], args.length > 2 ? args[2] : "main").run();
            System.out.println("ALL OK");
            System.out.flush();
            System.exit(0);
        } catch (Throwable e) {
            System.out.println("FAIL: " + e);
            System.out.flush();
            e.printStackTrace();
            System.exit(1);
        }
    }

    static void check(boolean condition, String what) {
        if (!condition) {
            throw new Mismatch(what);
        }
    }

    static void checkEquals(Object expected, Object got, String what) {
        if (expected == null ? got != null : !expected.equals(got)) {
            throw new Mismatch(what + ": expected " + expected + ", got " + got);
        }
    }

    Connection connect() throws SQLException {
        return DriverManager.getConnection(url);
    }

    static long scalarLong(PreparedStatement ps) throws SQLException {
        try (ResultSet rs = ps.executeQuery()) {
            check(rs.next(), "a row");
            long value = rs.getLong(1);
            check(!rs.next(), "exactly one row");
            return value;
        }
    }

    static long scalarLong(Connection conn, String sql) throws SQLException {
        try (Statement st = conn.createStatement(); ResultSet rs = st.executeQuery(sql)) {
            check(rs.next(), "a row from " + sql);
            return rs.getLong(1);
        }
    }

    static boolean serverPrepared(PreparedStatement ps) throws SQLException {
        return ps.unwrap(PGStatement.class).isUseServerPrepare();
    }

    void run() throws Exception {
        if (scenario.equals("aborted-transaction")) {
            abortedTransaction();
            return;
        }
        check(scenario.equals("main"), "unknown scenario " + scenario);
        try (Connection conn = connect()) {
            autocommitLoop(conn);
            transactions(conn);
            errorRecovery(conn);
            batchInsert(conn);
        }
        crossServers();
        concurrentConnections();
    }

    // A PreparedStatement run 20 times with different parameters, one transaction each.
    void autocommitLoop(Connection conn) throws SQLException {
        conn.setAutoCommit(true);
        try (PreparedStatement ps = conn.prepareStatement(
                "SELECT ?::int * 2 AS doubled, ?::text || '!' AS shout")) {
            for (int i = 0; i < AUTOCOMMIT_RUNS; i++) {
                ps.setInt(1, i);
                ps.setString(2, "v" + i);
                try (ResultSet rs = ps.executeQuery()) {
                    check(rs.next(), "autocommit row " + i);
                    checkEquals(2 * i, rs.getInt("doubled"), "autocommit doubled " + i);
                    checkEquals("v" + i + "!", rs.getString("shout"), "autocommit shout " + i);
                    check(!rs.next(), "autocommit one row " + i);
                }
            }
            check(serverPrepared(ps),
                  "statement is server-prepared after " + AUTOCOMMIT_RUNS + " runs");
            System.out.println("autocommit: ok runs=" + AUTOCOMMIT_RUNS + " server-prepared=true");
        }
    }

    // Transactions of several prepared statements, rolled back and committed.
    void transactions(Connection conn) throws SQLException {
        conn.setAutoCommit(false);
        try (PreparedStatement insert = conn.prepareStatement(
                     "INSERT INTO " + table + " (id, val, grp) VALUES (?, ?, ?)");
             PreparedStatement count = conn.prepareStatement(
                     "SELECT count(*) FROM " + table + " WHERE grp = ?");
             PreparedStatement pid = conn.prepareStatement("SELECT pg_backend_pid()");
             PreparedStatement update = conn.prepareStatement(
                     "UPDATE " + table + " SET val = val || ? WHERE grp = ?")) {
            for (int round = 0; round < 3; round++) {
                long firstPid = -1;
                for (int k = 0; k < 6; k++) {
                    insert.setInt(1, 1000 + round * 10 + k);
                    insert.setString(2, "r" + round + "k" + k);
                    insert.setString(3, "tx");
                    checkEquals(1, insert.executeUpdate(), "tx insert count");
                    count.setString(1, "tx");
                    checkEquals((long) k + 1, scalarLong(count),
                                "tx rows seen inside the transaction");
                    long backend = scalarLong(pid);
                    if (firstPid < 0) {
                        firstPid = backend;
                    }
                    checkEquals(firstPid, backend, "one server for the whole transaction");
                }
                update.setString(1, "-u");
                update.setString(2, "tx");
                checkEquals(6, update.executeUpdate(), "tx update count");
                if (round == 2) {
                    long onServer = scalarLong(conn, "SELECT count(*) FROM pg_prepared_statements");
                    check(onServer > 0,
                          "named statements exist on the server inside the transaction");
                    System.out.println("prepared-on-server: ok count=" + onServer);
                }
                conn.rollback();
                count.setString(1, "tx");
                checkEquals(0L, scalarLong(count), "tx rows after rollback, round " + round);
                conn.commit();
            }
            check(serverPrepared(insert) && serverPrepared(count) && serverPrepared(pid),
                  "transaction statements are server-prepared");
            System.out.println("transaction-rollback: ok rounds=3");

            for (int k = 0; k < 6; k++) {
                insert.setInt(1, 2000 + k);
                insert.setString(2, "kept" + k);
                insert.setString(3, "kept");
                insert.executeUpdate();
            }
            conn.commit();
        }
        conn.setAutoCommit(true);
        checkEquals(6L, scalarLong(conn, "SELECT count(*) FROM " + table + " WHERE grp = 'kept'"),
                    "committed rows");
        System.out.println("transaction-commit: ok rows=6");
    }

    // Errors from named statements, in and out of transactions, and the connection goes on.
    void errorRecovery(Connection conn) throws SQLException {
        conn.setAutoCommit(true);
        try (PreparedStatement div = conn.prepareStatement("SELECT 100 / ?::int")) {
            for (int i = 1; i <= 6; i++) {
                div.setInt(1, i);
                checkEquals((long) (100 / i), scalarLong(div), "division by " + i);
            }
            check(serverPrepared(div), "division statement is server-prepared");
            for (int attempt = 0; attempt < 3; attempt++) {
                div.setInt(1, 0);
                expectSqlState("22012", div, "division by zero in autocommit");
                div.setInt(1, 4);
                checkEquals(25L, scalarLong(div), "division after the error");
            }
            conn.setAutoCommit(false);
            div.setInt(1, 5);
            checkEquals(20L, scalarLong(div), "division in a transaction");
            div.setInt(1, 0);
            expectSqlState("22012", div, "division by zero in a transaction");
            div.setInt(1, 2);
            expectSqlState("25P02", div, "statement in the failed transaction");
            conn.rollback();
            div.setInt(1, 10);
            checkEquals(10L, scalarLong(div), "division after the rollback");
            conn.commit();
            conn.setAutoCommit(true);
        }
        System.out.println("error-recovery: ok");
    }

    static void expectSqlState(String sqlState, PreparedStatement ps, String what) {
        try {
            scalarLong(ps);
        } catch (SQLException e) {
            checkEquals(sqlState, e.getSQLState(), what + " (" + e.getMessage() + ")");
            return;
        }
        throw new Mismatch(what + ": expected SQLSTATE " + sqlState + ", got a result");
    }

    // addBatch/executeBatch, in autocommit and in a transaction, and a failing batch.
    void batchInsert(Connection conn) throws SQLException {
        int inserted = 0;
        long idSum = 0;
        try (PreparedStatement ps = conn.prepareStatement(
                "INSERT INTO " + table + " (id, val, grp) VALUES (?, ?, 'batch')")) {
            // Autocommit: one batch, then several small ones to go past prepareThreshold.
            conn.setAutoCommit(true);
            int id = 10000;
            for (int round = 0; round < 7; round++) {
                int rows = round == 0 ? BATCH_ROWS : 10;
                for (int r = 0; r < rows; r++) {
                    ps.setInt(1, id);
                    ps.setString(2, "b" + id);
                    ps.addBatch();
                    idSum += id;
                    id++;
                }
                int[] counts = ps.executeBatch();
                checkEquals(rows, counts.length, "batch result length");
                for (int c : counts) {
                    check(c == 1 || c == Statement.SUCCESS_NO_INFO, "batch row count " + c);
                }
                inserted += rows;
            }
            // In a transaction, committed.
            conn.setAutoCommit(false);
            for (int r = 0; r < BATCH_ROWS; r++) {
                ps.setInt(1, id);
                ps.setString(2, "b" + id);
                ps.addBatch();
                idSum += id;
                id++;
            }
            checkEquals(BATCH_ROWS, ps.executeBatch().length, "transaction batch length");
            conn.commit();
            inserted += BATCH_ROWS;
            // A batch that hits a duplicate key: nothing of it stays after the rollback.
            for (int r = 0; r < 5; r++) {
                ps.setInt(1, 90000 + r);
                ps.setString(2, "dup");
                ps.addBatch();
            }
            ps.setInt(1, 10000);  // already there
            ps.setString(2, "dup");
            ps.addBatch();
            try {
                ps.executeBatch();
                throw new Mismatch("duplicate key batch: expected an error");
            } catch (BatchUpdateException e) {
                SQLException cause = e.getNextException() != null ? e.getNextException() : e;
                checkEquals("23505", cause.getSQLState(), "duplicate key batch SQLSTATE");
            }
            conn.rollback();
            conn.setAutoCommit(true);
            check(serverPrepared(ps), "batch insert is server-prepared");
        }
        checkEquals((long) inserted,
                    scalarLong(conn, "SELECT count(*) FROM " + table + " WHERE grp = 'batch'"),
                    "batch rows");
        checkEquals(idSum,
                    scalarLong(conn, "SELECT sum(id) FROM " + table + " WHERE grp = 'batch'"),
                    "batch id sum");
        System.out.println("batch: ok rows=" + inserted);
    }

    // Three connections, two servers: a named statement of B runs on both servers in turn.
    // A and C hold servers with open transactions so B has exactly one server to go to.
    void crossServers() throws SQLException {
        try (Connection a = connect(); Connection b = connect(); Connection c = connect();
             PreparedStatement bStmt = b.prepareStatement("SELECT pg_backend_pid(), ?::int + 1");
             PreparedStatement aPid = a.prepareStatement("SELECT pg_backend_pid()");
             PreparedStatement cPid = c.prepareStatement("SELECT pg_backend_pid()")) {
            Set<Long> bPids = new TreeSet<>();
            int n = 0;
            for (; n < 6; n++) {
                bPids.add(runB(bStmt, n));
            }
            check(serverPrepared(bStmt), "B's statement is server-prepared");

            a.setAutoCommit(false);
            long pidA = scalarLong(aPid);        // A holds one server
            long pidB1 = runB(bStmt, n++);       // B: the other one
            c.setAutoCommit(false);
            long pidC = scalarLong(cPid);        // C holds the server B just used
            a.commit();                          // A's server is free again
            long pidB2 = runB(bStmt, n++);       // B: there
            c.commit();
            a.setAutoCommit(true);
            c.setAutoCommit(true);
            bPids.add(pidB1);
            bPids.add(pidB2);
            for (int i = 0; i < 10; i++) {
                bPids.add(runB(bStmt, n++));
            }
            System.out.println("cross-servers: ok b-servers=" + bPids.size()
                               + " b1-is-c=" + (pidB1 == pidC) + " b2-is-a=" + (pidB2 == pidA));
        }
    }

    // A named statement run inside a failed transaction on a server it was never prepared on
    // fails (25P02, as PostgreSQL says); after the rollback it must work on that server.
    void abortedTransaction() throws SQLException {
        try (Connection a = connect(); Connection b = connect(); Connection c = connect();
             PreparedStatement bStmt = b.prepareStatement("SELECT pg_backend_pid(), ?::int + 1");
             PreparedStatement aPid = a.prepareStatement("SELECT pg_backend_pid()");
             PreparedStatement cPid = c.prepareStatement("SELECT pg_backend_pid()");
             Statement bPlain = b.createStatement()) {
            a.setAutoCommit(false);
            long pidA = scalarLong(aPid);        // A holds one server
            long pidB = -1;
            int n = 0;
            for (; n < 6; n++) {
                pidB = runB(bStmt, n);           // B: the other one, named from the 5th run
            }
            check(serverPrepared(bStmt), "B's statement is server-prepared");
            c.setAutoCommit(false);
            scalarLong(cPid);                    // C holds B's server
            a.commit();
            b.setAutoCommit(false);              // B: on A's server, where the statement is not
            try {
                bPlain.executeQuery("SELECT 1 / 0");
                throw new Mismatch("division by zero: expected an error");
            } catch (SQLException e) {
                checkEquals("22012", e.getSQLState(), "division by zero in the transaction");
            }
            bStmt.setInt(1, n);
            expectSqlState("25P02", bStmt, "named statement in the failed transaction");
            b.rollback();
            long pidAfter = runB(bStmt, n++);    // B: on A's server again, C holds the other
            b.commit();
            c.commit();
            for (int i = 0; i < 5; i++) {
                runB(bStmt, n++);
                b.commit();
            }
            b.setAutoCommit(true);
            System.out.println("aborted-transaction: ok b-first-on-a=" + (pidB == pidA)
                               + " b-after-on-a=" + (pidAfter == pidA));
        }
    }

    static long runB(PreparedStatement ps, int n) throws SQLException {
        ps.setInt(1, n);
        try (ResultSet rs = ps.executeQuery()) {
            check(rs.next(), "B row");
            checkEquals(n + 1, rs.getInt(2), "B value");
            return rs.getLong(1);
        }
    }

    // Several connections at once, each with its own and a shared statement text.
    void concurrentConnections() throws Exception {
        ExecutorService pool = Executors.newFixedThreadPool(THREADS);
        Set<Long> servers = new ConcurrentSkipListSet<>();
        try {
            List<Future<Integer>> futures = new ArrayList<>();
            for (int t = 0; t < THREADS; t++) {
                final int thread = t;
                futures.add(pool.submit(() -> worker(thread, servers)));
            }
            int total = 0;
            for (Future<Integer> f : futures) {
                total += f.get(25, TimeUnit.SECONDS);
            }
            checkEquals(THREADS * THREAD_ITERATIONS, total, "concurrent iterations");
        } finally {
            pool.shutdownNow();
        }
        System.out.println("concurrent: ok threads=" + THREADS + " iterations=" + THREAD_ITERATIONS
                           + " servers=" + servers.size());
    }

    int worker(int thread, Set<Long> servers) throws SQLException {
        try (Connection conn = connect();
             PreparedStatement shared = conn.prepareStatement(
                     "SELECT ?::int * 3, pg_backend_pid()");
             PreparedStatement own = conn.prepareStatement(
                     "SELECT ?::int + " + (thread * 1000) + ", ?::text")) {
            for (int i = 0; i < THREAD_ITERATIONS; i++) {
                boolean inTransaction = i % 8 == 7;
                if (inTransaction) {
                    conn.setAutoCommit(false);
                }
                shared.setInt(1, i);
                try (ResultSet rs = shared.executeQuery()) {
                    check(rs.next(), "shared row");
                    checkEquals(3 * i, rs.getInt(1), "shared value thread " + thread);
                    servers.add(rs.getLong(2));
                }
                own.setInt(1, i);
                own.setString(2, "t" + thread);
                try (ResultSet rs = own.executeQuery()) {
                    check(rs.next(), "own row");
                    checkEquals(thread * 1000 + i, rs.getInt(1), "own value thread " + thread);
                    checkEquals("t" + thread, rs.getString(2), "own text thread " + thread);
                }
                if (inTransaction) {
                    conn.commit();
                    conn.setAutoCommit(true);
                }
            }
            check(serverPrepared(shared) && serverPrepared(own),
                  "thread statements are server-prepared");
            return THREAD_ITERATIONS;
        }
    }
}
