'use strict';
// node-postgres against pgmulti in transaction pooling (or PostgreSQL directly).
//
//     node check.js HOST PORT TABLE [SCENARIO]
//
// Named statements ({name, text, values}) are parsed once per pg connection and then only bound,
// so a transaction pooler must rewrite their names and prepare them on whichever server a
// transaction lands on. TABLE is an existing table (id int primary key, val text, grp text).
// SCENARIO is "main" (the default) or "aborted-transaction".
//
// Prints one line per check ("name: ok ...") and "ALL OK"; on a mismatch prints "FAIL: ..."
// and exits 1.

const pg = require('pg');

const OVERALL_TIMEOUT_MS = 20000;

const [host, portText, table, scenario = 'main'] = process.argv.slice(2);
if (!host || !portText || !table) {
  console.error('usage: node check.js HOST PORT TABLE [main|aborted-transaction]');
  process.exit(2);
}
const config = {
  host,
  port: Number(portText),
  user: 'postgres',
  database: 'testdb',
  connectionTimeoutMillis: 5000,
  query_timeout: 15000,
};

class Mismatch extends Error {}

function check(condition, what) {
  if (!condition) throw new Mismatch(what);
}

function equal(expected, got, what) {
  if (expected !== got) {
    throw new Mismatch(`${what}: expected ${JSON.stringify(expected)}, got ${JSON.stringify(got)}`);
  }
}

async function expectError(promise, code, what) {
  try {
    await promise;
  } catch (err) {
    if (err instanceof Mismatch) throw err;
    equal(code, err.code, `${what} (${err.message})`);
    return;
  }
  throw new Mismatch(`${what}: expected SQLSTATE ${code}, got a result`);
}

const clients = [];

async function connect() {
  const client = new pg.Client(config);
  client.on('error', (err) => console.error(`client error: ${err.message}`));
  await client.connect();
  clients.push(client);
  return client;
}

const GET_ONE = 'SELECT $1::int + 1 AS v';

async function getOne(client, n) {
  const result = await client.query({ name: 'get-one', text: GET_ONE, values: [n] });
  equal(1, result.rows.length, 'get-one rows');
  equal(n + 1, result.rows[0].v, `get-one(${n})`);
}

// get-one's twin that also says which server ran it.
async function getOnePid(client, n) {
  const result = await client.query({
    name: 'get-one-pid',
    text: 'SELECT $1::int + 1 AS v, pg_backend_pid() AS pid',
    values: [n],
  });
  equal(n + 1, result.rows[0].v, `get-one-pid(${n})`);
  return result.rows[0].pid;
}

async function backendPid(client) {
  return (await client.query('SELECT pg_backend_pid() AS pid')).rows[0].pid;
}

// Three clients at once on two servers, each running the same named statements.
async function concurrentNamed() {
  const runs = 60;
  const trio = [await connect(), await connect(), await connect()];
  const servers = new Set();
  await Promise.all(trio.map(async (client, index) => {
    for (let i = 0; i < runs; i++) {
      const n = index * 1000 + i;
      if (i % 5 === 4) {
        servers.add(await getOnePid(client, n));
      } else {
        await getOne(client, n);
      }
    }
  }));
  console.log(`concurrent-named: ok clients=3 runs=${runs} servers=${servers.size}`);
}

// A and C hold servers with open transactions so B has exactly one server to go to:
// B's named statement runs on the first server, then on the second.
async function crossServers() {
  const [a, b, c] = [await connect(), await connect(), await connect()];
  const bPids = new Set();
  let n = 0;
  for (; n < 3; n++) bPids.add(await getOnePid(b, n));
  await a.query('BEGIN');
  const pidA = await backendPid(a);      // A holds one server
  const pidB1 = await getOnePid(b, n++); // B: the other one
  await c.query('BEGIN');
  const pidC = await backendPid(c);      // C holds the server B just used
  await a.query('COMMIT');               // A's server is free again
  const pidB2 = await getOnePid(b, n++); // B: there
  await c.query('COMMIT');
  bPids.add(pidB1).add(pidB2);
  for (let i = 0; i < 5; i++) bPids.add(await getOnePid(b, n++));
  console.log(`cross-servers: ok b-servers=${bPids.size} b1-is-c=${pidB1 === pidC}`
    + ` b2-is-a=${pidB2 === pidA}`);
}

async function transactions() {
  const client = await connect();
  const other = await connect();
  const insert = (id, grp) => client.query({
    name: 'tx-insert',
    text: `INSERT INTO ${table} (id, val, grp) VALUES ($1, $2, $3) RETURNING id`,
    values: [id, `v${id}`, grp],
  });
  const count = (conn, grp) => conn.query({
    name: 'tx-count',
    text: `SELECT count(*)::int AS n FROM ${table} WHERE grp = $1`,
    values: [grp],
  }).then((result) => result.rows[0].n);

  await client.query('BEGIN');
  const pid = await backendPid(client);
  for (let k = 0; k < 5; k++) {
    equal(100 + k, (await insert(100 + k, 'committed')).rows[0].id, 'tx-insert returning');
    equal(k + 1, await count(client, 'committed'), 'rows seen inside the transaction');
    await getOne(other, k); // the other client runs on the other server meanwhile
  }
  equal(pid, await backendPid(client), 'one server for the whole transaction');
  equal(0, await count(other, 'committed'), 'uncommitted rows seen by another client');
  await client.query('COMMIT');
  equal(5, await count(other, 'committed'), 'committed rows seen by another client');

  await client.query('BEGIN');
  for (let k = 0; k < 3; k++) await insert(200 + k, 'rolled-back');
  equal(3, await count(client, 'rolled-back'), 'rows before the rollback');
  await client.query('ROLLBACK');
  equal(0, await count(client, 'rolled-back'), 'rows after the rollback');
  console.log('transaction: ok committed=5 rolled-back=3');
}

// Errors from named and unnamed statements; the client goes on with its named statements.
async function errorRecovery() {
  const client = await connect();
  const busy = await connect(); // keeps the second server in use now and then
  const div = (n) => client.query({ name: 'div', text: 'SELECT 100 / $1::int AS q', values: [n] });
  for (let i = 0; i < 3; i++) await getOne(client, i);
  await expectError(div(0), '22012', 'first execution of a named statement divides by zero');
  for (let i = 0; i < 20; i++) {
    await Promise.all([getOne(client, i), getOne(busy, i)]);
  }
  equal(25, (await div(4)).rows[0].q, 'div(4)');
  await expectError(div(0), '22012', 'named statement divides by zero again');
  await expectError(client.query('SELECT 1 / 0'), '22012', 'unnamed statement divides by zero');
  for (let i = 0; i < 10; i++) {
    await Promise.all([getOne(client, i), div(i + 1), getOne(busy, i)]);
  }
  equal(50, (await div(2)).rows[0].q, 'div(2)');
  console.log('error-recovery: ok');
}

// pg.Pool with five clients and fifty concurrent queries.
async function poolQueries() {
  const pool = new pg.Pool({ ...config, max: 5 });
  pool.on('error', (err) => console.error(`pool error: ${err.message}`));
  const servers = new Set();
  try {
    const results = await Promise.all(Array.from({ length: 50 }, (_, i) => pool.query({
      name: 'pool-q',
      text: 'SELECT $1::int * 2 AS d, pg_backend_pid() AS pid',
      values: [i],
    })));
    results.forEach((result, i) => {
      equal(i * 2, result.rows[0].d, `pool query ${i}`);
      servers.add(result.rows[0].pid);
    });
    equal(5, pool.totalCount, 'pool connections');
  } finally {
    await pool.end();
  }
  console.log(`pool: ok queries=50 servers=${servers.size}`);
}

// A named statement bound inside a failed transaction on a server it was never prepared on
// fails (25P02, as PostgreSQL says); after the rollback it must work there again.
async function abortedTransaction() {
  const [a, b, c] = [await connect(), await connect(), await connect()];
  await a.query('BEGIN');
  const pidA = await backendPid(a);       // A holds one server
  const pidB = await getOnePid(b, 1);     // B parses get-one-pid on the other one
  await c.query('BEGIN');
  await backendPid(c);                    // C holds B's server
  await a.query('COMMIT');
  await b.query('BEGIN');                 // B: on A's server, where get-one-pid is unknown
  await expectError(b.query('SELECT 1 / 0'), '22012', 'division by zero in the transaction');
  await expectError(getOnePid(b, 2), '25P02', 'named statement in the failed transaction');
  await b.query('ROLLBACK');
  const pidAfter = await getOnePid(b, 3); // B: on A's server again, C still holds the other
  await c.query('COMMIT');
  for (let i = 0; i < 5; i++) await getOnePid(b, i);
  console.log(`aborted-transaction: ok b-first-on-a=${pidB === pidA}`
    + ` b-after-on-a=${pidAfter === pidA}`);
}

const SCENARIOS = {
  main: [concurrentNamed, crossServers, transactions, errorRecovery, poolQueries],
  'aborted-transaction': [abortedTransaction],
};

async function main() {
  const steps = SCENARIOS[scenario];
  if (!steps) throw new Error(`unknown scenario ${scenario}`);
  try {
    for (const step of steps) await step();
  } finally {
    await Promise.all(clients.map((client) => client.end().catch(() => {})));
  }
}

const timer = setTimeout(() => {
  console.log(`FAIL: timed out after ${OVERALL_TIMEOUT_MS} ms`);
  process.exit(1);
}, OVERALL_TIMEOUT_MS);
timer.unref();

main().then(() => {
  console.log('ALL OK');
  process.exitCode = 0;
}, (err) => {
  console.log(`FAIL: ${err instanceof Mismatch ? '' : `${err.code || ''} `}${err.message}`);
  console.error(err.stack);
  process.exitCode = 1;
});
