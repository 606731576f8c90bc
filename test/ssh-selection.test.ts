/**
 * Host selection and machine health, without SSH: the strategies, capacity
 * and maxConcurrent, waiting for a slot, strikes that retire a machine and
 * probation that brings it back.
 */
import t from 'tap';
import { setTimeout as sleep } from 'node:timers/promises';
import { ResourceUnavailableError } from '../src/model/errors.js';
import { MachinePool, pickMachine, type MachineSpec } from '../src/hosts/selection.js';
import { LocalTransport } from '../src/hosts/local.js';

const transport = new LocalTransport();
const machines = (...capacities: number[]): MachineSpec<LocalTransport>[] => capacities.map((capacity, i) => ({ address: `m${i}`, transport, capacity, labels: i === 0 ? ['gpu'] : [] }));

t.test('pickMachine: round-robin rotates, least-loaded balances by name then load, random uses the random source', async (t) => {
  const view = (name: string, running: number, byName: Record<string, number> = {}) => ({ name, running, capacity: 4, byName: (n: string) => byName[n] ?? 0 });
  const cursor = { value: 0 };
  const all = [view('a', 0), view('b', 0), view('c', 0)];
  t.same([1, 2, 3, 4].map(() => pickMachine('round-robin', all, undefined, cursor)!.name), ['a', 'b', 'c', 'a']);
  const loaded = [view('a', 1, { render: 1 }), view('b', 3, { encode: 3 }), view('c', 2, { render: 1, encode: 1 })];
  t.equal(pickMachine('least-loaded', loaded, 'render', { value: 0 })!.name, 'b', 'fewest of the same name wins, even on a busier host');
  t.equal(pickMachine('least-loaded', loaded, 'encode', { value: 0 })!.name, 'a');
  t.equal(pickMachine('least-loaded', loaded, undefined, { value: 0 })!.name, 'a', 'without a name: the least busy');
  t.equal(pickMachine('random', all, undefined, { value: 0 }, () => 0.7)!.name, 'c');
  t.equal(pickMachine('random', [], undefined, { value: 0 }), undefined);
});

t.test('the pool respects capacity and maxConcurrent, and waits for a free slot', async (t) => {
  const pool = new MachinePool(machines(2, 2), { probe: async () => {}, strategy: 'least-loaded' });
  await pool.start();
  t.teardown(() => pool.close());
  const a = await pool.acquire({ name: 'x', maxConcurrent: 1 });
  const b = await pool.acquire({ name: 'x', maxConcurrent: 1 });
  t.not(a.address, b.address, 'one x per machine');
  let third: string | undefined;
  const waiting = pool.acquire({ name: 'x', maxConcurrent: 1 }).then((slot) => (third = slot.address));
  await sleep(50);
  t.equal(third, undefined, 'a third x waits: maxConcurrent 1 on both machines');
  const other = [await pool.acquire({ name: 'y' }), await pool.acquire({ name: 'y' })];
  t.same(pool.status().map((m) => m.running), [2, 2], 'other names still fit, up to capacity');
  const abort = new AbortController();
  const aborted = pool.acquire({ name: 'z', signal: abort.signal });
  abort.abort(new Error('gave up'));
  await t.rejects(aborted, /gave up/, 'waiting is bounded by the signal');
  b.release();
  b.release();
  await waiting;
  t.equal(third, b.address, 'the freed machine takes the waiting x');
  for (const slot of [a, ...other]) slot.release();
  t.equal((await pool.acquire({ labels: ['gpu'] })).address, 'm0', 'labels choose the machine');
  await t.rejects(pool.acquire({ labels: ['tpu'] }), ResourceUnavailableError);
  await t.rejects(pool.acquire({ address: 'nope' }), /no host nope/);
});

t.test('failures are strikes: down, then retired; probation brings a down machine back; slots hear of it', async (t) => {
  let healthy = true;
  const pool = new MachinePool(machines(1, 1), { probe: async () => { if (!healthy) throw new Error('refused'); }, strikes: 2, probationMs: 50, checkIntervalMs: 10 });
  await pool.start();
  t.teardown(() => pool.close());
  const slot = await pool.acquire({ address: 'm1' });
  pool.markDown('m1', new Error('connection lost'));
  t.ok(slot.lost.aborted, 'the slot on it is told');
  t.match((slot.lost.reason as Error).message, 'host m1 went down: connection lost');
  t.match(pool.status()[1], { state: 'down', strikes: 1, error: 'connection lost' });
  slot.release();
  const elsewhere = await pool.acquire({});
  t.equal(elsewhere.address, 'm0', 'new work goes elsewhere');
  elsewhere.release();
  healthy = false;
  await sleep(150);
  t.match(pool.status()[1], { state: 'retired', strikes: 2, error: 'refused' }, 'the failed probe was the second strike');
  pool.markDown('m0', new Error('gone'));
  await t.rejects(pool.acquire({}), { name: 'ResourceUnavailableError', message: /no host is up: m0 is down \(gone\); m1 is retired \(refused\)/ });
  healthy = true;
  await sleep(150);
  t.match(pool.status(), [{ state: 'up', strikes: 1 }, { state: 'retired' }], 'probation brought m0 back; m1 stays retired');
  const working = await pool.acquire({});
  pool.markWorking(working.address);
  t.equal(pool.status()[0]!.strikes, 0, 'a command that started clears the strikes');
});
