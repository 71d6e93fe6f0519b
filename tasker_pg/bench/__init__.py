"""`tasker-pg bench`: throughput and latency, measured against a raw SQL baseline in the same run.

```
tasker-pg bench                       # every scenario, embedded database, default sizes
tasker-pg bench --scenario flat --workers 2 --handler-ms 10 --json
python -m tasker_pg.bench --dsn postgresql://user@host/db --n 0.1
```

Absolute numbers drift on shared machines; ratios to a baseline measured in the same run hold.
Every scenario runs on a fresh database (`bench_<scenario>_<pid>`, created on the server of the
DSN, migrated, dropped afterwards: the DSN's user needs CREATEDB, and CREATEROLE until
`migrate` has created the tasker roles). The server is the embedded cluster (started if
needed) unless `--dsn` is given.

Scenarios (default sizes; `--n` scales every count):

- baseline: a raw asyncpg loop with pgmq semantics over one plain table: 4 connections, each
  claiming 50 messages per statement (`FOR UPDATE SKIP LOCKED`, vt pushed, read_ct + 1) and
  acknowledging them with one batched DELETE, until 100,000 pre-filled messages are gone.
  Messages/s: the ceiling for at-least-once claim-and-acknowledge on this machine. It runs
  whenever a scenario with a ratio runs, and then once more at the end of the run: the
  drift between the two says how steady the machine was (a warning above 15 %).
- flat: 20,000 single-step tasks, drained by `--workers` worker processes (`python -m
  tasker_pg.worker_cli`, `--concurrency` each) running a no-op async handler. Steps/s and the
  ratio to the baseline.
- dag: 2,000 four-step diamonds, then 2,000 four-step linear chains (each on its own fresh
  database), drained the same way: steps/s, tasks/s, ratio.
- fanout: 10 tasks of one batchable analyzer, 1,000 batch workers and one deferred
  convergence (which reads every worker's result, in pages when the claim cannot carry them),
  drained the same way: steps/s, ratio. Then, on the same database, the fan-out transaction on
  its own: the benchmark claims an analyzer and sends the outcome a worker would, timing the
  `complete_steps` call that creates the 1,000 workers and commits (5 times; p50 and max).
- deep: 1,000,000 single-step tasks queued at once, drained the same way: steps/s against the
  clean flat drain of the run (target 0.90x), with the hot tables' sizes and dead tuples when
  queued and when drained (the completion poll runs every 2 s here: it counts a large table).
- backlog: the flat drain again while 100,000 other steps of the same queue are not visible
  (a third leased for a day, a third waiting a day for a retry, a third delayed up to a year,
  created and claimed through the engine before the workers start): against the clean flat
  drain (target 0.90x), since a claim must not pay for what it cannot hand out.
- retention: the flat drain while another session runs `tasker.purge_finished(1000)` batch
  after batch (paced as a worker paces it: a pause four times as long as the last batch took) over a
  1,000,000-task history (created through `create_tasks`, then made complete
  two days ago in SQL) under a one-day policy: against the clean flat drain (target 0.80x), and
  the purge's tasks/s.
- limits: the flat drain with flow control on every step (sql/functions/55_flow.sql), against
  the clean flat drain of the same run (target 0.80x; server CPU per step in the notes):
  fairness lanes by customer over a skewed backlog (10 customers, customer k with k + 1
  shares of the 20,000 tasks), then a concurrency limit of 100 per customer, then that and a
  rate limit of 1,000,000 tokens/s, both over an even backlog (neither limit binds: what is
  measured is the claim's cost). And the share of the claims each customer got in the fairness
  drain while every customer still had a backlog (the first 80 % of 10 x the smallest
  backlog, in audit order): each within 10 % of an equal share.
- scale: the flat drain with 1, 2 and 4 worker processes; then one worker running 16 to 256
  handlers of 10 ms at once (5,000 tasks each): steps/s and the share of the ideal rate. No
  target: the table shows where the database saturates.
- xmin (`bench/xmin.py`): flat and diamond tasks arriving every 100 ms at a quarter of the
  capacity `dag` measured, for 180 s, then again (fresh database) while another session holds a
  REPEATABLE READ snapshot taken by reading `tasker.tasks`; each phase warms up a tenth of its
  length and takes statistics first. Per 10 s window: tasks arrived and completed, lag p50 and
  p99 from creation to completion; dead tuples and sizes of the hot tables at the end of each
  phase. Targets: every held window completes at least 90 % of the clean phase's share, lag
  p99 under 1 s.
- latency: one idle worker; 200 single-step tasks created one at a time at 50/s
  (create-to-handler-start), then 200 four-step linear tasks at 50/s (step handoff: parent's
  outcome committed to child's handler start; and end to end). p50, p90, p99 and max of each,
  next to the raw loop's comparable latency of the same run (`baseline.latency_probe`, on a
  fresh database of its own): first the idle server's commit round trip (200 one-row INSERTs
  at 50/s, autocommit: the floor under every latency with fsync on); then 200 messages sent at
  50/s (one INSERT + pg_notify statement each) to one consumer connection that sleeps until a
  NOTIFY, then claims (the baseline's claim) until nothing is visible and acknowledges each
  claim with a DELETE in its own transaction: send to claim (next to create-to-start) and send
  to acknowledged commit; then 200 chains of 4 messages at 50/s, where the acknowledgement of
  a hop inserts the next one in its transaction (as complete_steps enqueues a ready child):
  the next hop's enqueued_at to its claim (next to the step handoff), and the first hop's
  enqueued_at to the last hop's acknowledged commit (next to end to end). The consumer runs
  in the benchmark's process, beside the paced sender.
- create: four-step tasks per second on one connection: one `tasker.create_task` per call
  (autocommit, as a client would), then `tasker.create_tasks` batches of 1,000; next to a bare
  one-row INSERT per call on the same connection, the machine's own price of a commit. Both
  targets are read against that bare insert (the batches may meet theirs by an absolute rate
  instead).

Tasks carry a small context (`{"i": n}`); every handler is a no-op (or sleeps `--handler-ms`).
How the throughput scenarios measure: the workers start first and sit idle (listening); all the
tasks are then created in ONE transaction (not timed), so they become visible at once when it
commits and the NOTIFY wakes every worker together. The same transaction ANALYZEs the tables, as
a database in steady state would have statistics (fresh tables without them get plans that
drain DAGs about three times slower). The measured interval runs from the first claim to the
last task's completion, both read from the database's own timestamps (the first `claimed` step
transition, `max(tasks.completed_at)`). The benchmark notices the end by polling `count(*)` of
complete tasks every 100 ms (cheaper for 20,000 tasks than one notification per task on
`tasker_task_events`); the poll only detects the end, it does not time it.

Latency uses the database clock for what the database decides and `time.time()` recorded by the
handler at its start; both clocks are this machine's. Create-to-start runs from the task's
`created_at` (taken when `create_task` begins, so it includes the create call and its commit, a
WAL flush with fsync on). The handoff runs from the child step's `enqueued_at` (written at the
end of the parent's `complete_steps`, just before it commits) to the child's handler start; the
JSON also gives it from the start of the parent's `complete_steps` call. End to end runs from
`created_at` to the task's `completed_at`, written before the last step's outcome commits; the
raw chain's end is when its last acknowledgement returns to the consumer, that commit included.

Nothing is reported that did not happen: before a scenario's numbers are printed, every task
must be complete, every step complete exactly once, no message left and
`tasker.check_invariants()` empty; otherwise the scenario fails loudly and the command exits 1.
When the server runs on this machine, the CPU time of the worker processes and of their server
backends is reported per step (from /proc): the split between Python and SQL.

The package, one job per module:

- `options`: what to run (`BenchOptions`), default sizes and the targets (in one block).
- `scenarios`: the scenarios but xmin; `xmin`: the held-snapshot scenario; `runner`: the run
  around them (fresh databases, completion polling, verification, the order of scenarios,
  what each scenario brings along: flat for deep, backlog, retention and limits, dag for xmin).
- `baseline`: the raw SQL claim/acknowledge loop (throughput, and latency at a trickle), the
  idle commit round trip and the bare INSERT the engine is compared with.
- `queries`: the setup and inspection queries (counts, timings, settings) in one place.
- `workers`: the worker processes (`python -m tasker_pg.worker_cli`); `handlers`: what they run.
- `machine`: CPU accounting from /proc and the description of the machine.
- `report`: the table, the verdict of every row with a target, its notes and percentiles.
- `cli`: `python -m tasker_pg.bench` and the `tasker-pg bench` subcommand (whose options live in
  `tasker_pg.bench_args`, so that `tasker-pg` does not import this package until it runs).
"""
