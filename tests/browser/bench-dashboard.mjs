// Benchmark of the Experiments dashboard: seeds 500 runs × 5 metrics × 2000 steps with
// `atelier runs seed`, starts a real `atelier serve` on them, and measures in headless
// Chromium (1) loading the runs table (navigation to the table's 500 rows drawn) and
// (2) drawing a 10-run comparison (ticking 10 runs to their 10 SVG curves present,
// each history fetched cold). Prints a table; results go to BENCHMARKS.md.
//
// Run after `cargo run -p xtask -- build`: `node bench-dashboard.mjs`.
// Env: ATELIER_BIN, ATELIER_ROOT, CHROMIUM as for generate.spec.mjs; RUNS, METRICS, STEPS
// (default 500, 5, 2000); REPEATS (default 3).

import { spawn, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { root, serverBinary, freePort, waitForHealth } from './support.mjs';

const RUNS = Number(process.env.RUNS ?? 500);
const METRICS = Number(process.env.METRICS ?? 5);
const STEPS = Number(process.env.STEPS ?? 2000);
const REPEATS = Number(process.env.REPEATS ?? 3);
const COMPARED = 10;


const median = (xs) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
const fmt = (ms) => `${(ms / 1000).toFixed(2)} s`;

const bin = serverBinary();
if (!existsSync(bin) || !existsSync(path.join(root, 'target/site/pkg/atelier_bg.wasm'))) {
  console.error(`${bin} or target/site is missing: run cargo run -p xtask -- build`);
  process.exit(1);
}
const dataDir = mkdtempSync(path.join(tmpdir(), 'atelier-bench-'));
let server;
let browser;
try {
  let t = performance.now();
  execFileSync(bin, ['runs', 'seed', '--tracking', path.join(dataDir, 'tracking'), '--experiment', 'bench', '--runs', String(RUNS), '--metrics', String(METRICS), '--steps', String(STEPS), '--seed', '1'], { stdio: 'inherit' });
  const seedMs = performance.now() - t;

  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  server = spawn(bin, ['serve', '--addr', `127.0.0.1:${port}`, '--data-dir', dataDir, '--model', path.join(root, 'models/starter'), '--site-root', path.join(root, 'target/site')], { cwd: root, stdio: 'ignore' });
  await waitForHealth(base, server, 120_000);

  // The API alone (the search behind the table), from Node.
  const api = [];
  for (let i = 0; i < REPEATS + 1; i++) {
    t = performance.now();
    const list = await (await fetch(`${base}/api/experiments/bench/runs`)).json();
    api.push(performance.now() - t);
    if (list.length !== RUNS) throw new Error(`expected ${RUNS} runs, got ${list.length}`);
  }

  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium', headless: true, args: ['--no-sandbox', '--disable-gpu'] });
  const page = await browser.newPage({ viewport: { width: 1400, height: 1000 } });
  const table = [];
  const compare = [];
  for (let i = 0; i < REPEATS; i++) {
    t = performance.now();
    await page.goto(`${base}/experiments?experiment=bench`);
    await page.waitForFunction((n) => document.querySelector('.run-count')?.textContent === `${n} runs` && document.querySelectorAll('table.runs tbody tr').length === n, RUNS, { timeout: 120_000, polling: 'raf' });
    table.push(performance.now() - t);

    // Tick 10 runs not compared before (so every history is fetched), timed in the page
    // from the first tick to the 10th curve drawn.
    const ms = await page.evaluate(
      ([from, count, steps]) =>
        new Promise((resolve, reject) => {
          const boxes = [...document.querySelectorAll('input.pick-run')].slice(from, from + count);
          const t0 = performance.now();
          for (const b of boxes) b.click();
          const want = Math.min(steps, 1000);
          const check = () => {
            const paths = document.querySelectorAll('svg.metric-chart path.curve');
            if (paths.length === count && [...paths].every((p) => Number(p.dataset.points) === want)) return resolve(performance.now() - t0);
            if (performance.now() - t0 > 120_000) return reject(new Error(`only ${paths.length} curves after 120 s`));
            requestAnimationFrame(check);
          };
          check();
        }),
      [i * COMPARED, COMPARED, STEPS],
    );
    compare.push(ms);
  }

  console.log(`\n${RUNS} runs × ${METRICS} metrics × ${STEPS} steps (${(RUNS * METRICS * STEPS / 1e6).toFixed(1)} M points)\n`);
  console.log('| measure | median | all |');
  console.log('|---|---|---|');
  console.log(`| seed (atelier runs seed) | ${fmt(seedMs)} | |`);
  console.log(`| GET /api/experiments/bench/runs, first | ${fmt(api[0])} | |`);
  console.log(`| GET /api/experiments/bench/runs, after | ${fmt(median(api.slice(1)))} | ${api.slice(1).map(fmt).join(', ')} |`);
  console.log(`| page load to the runs table drawn | ${fmt(median(table))} | ${table.map(fmt).join(', ')} |`);
  console.log(`| tick ${COMPARED} runs to ${COMPARED} curves drawn (${Math.min(STEPS, 1000)} points each, LTTB) | ${fmt(median(compare))} | ${compare.map(fmt).join(', ')} |`);
} finally {
  await browser?.close();
  if (server && server.exitCode === null) server.kill('SIGTERM');
  rmSync(dataDir, { recursive: true, force: true });
}
