// Helpers shared by the browser tests and the dashboard benchmark: the `atelier` binary to
// run, a free port, waiting for a started studio to answer `/api/health`, starting a studio
// on the starter model, and a headless Chromium page that collects page errors.

import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

/** The repository root: ATELIER_ROOT, else two folders up from here. */
export const root = process.env.ATELIER_ROOT ?? path.resolve(import.meta.dirname, '../..');

/** The server binary: ATELIER_BIN, else target/debug/atelier as `cargo metadata` places it. */
export function serverBinary() {
  if (process.env.ATELIER_BIN) return process.env.ATELIER_BIN;
  const meta = JSON.parse(
    execFileSync('cargo', ['metadata', '--format-version', '1', '--no-deps'], { cwd: root, encoding: 'utf8' }),
  );
  return path.join(meta.target_directory, 'debug', 'atelier');
}

/** A TCP port free on 127.0.0.1 right now. */
export function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves once `url`/api/health answers 200; rejects if `server` exits or after `timeoutMs`. */
export async function waitForHealth(url, server, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (Date.now() < deadline) {
    if (server.exitCode !== null) throw new Error(`atelier exited early with ${server.exitCode}`);
    try {
      if ((await fetch(`${url}/api/health`)).ok) return;
    } catch {
      // not listening yet
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  throw new Error(`server at ${url} did not become healthy in ${timeoutMs} ms`);
}

/**
 * Starts `atelier serve` on the built-in starter model with a fresh data folder (named after
 * `prefix`) on a free port, plus `extraArgs`, and waits until it answers. Returns
 * `{ baseUrl, dataDir, log(), stop() }`; `stop()` ends the server (SIGTERM, then SIGKILL after
 * 10 s), removes the data folder and prints the server's log when the test run failed.
 */
export async function startStudio(prefix, extraArgs = []) {
  const bin = serverBinary();
  if (!existsSync(bin)) throw new Error(`${bin} is missing: run cargo run -p xtask -- build`);
  if (!existsSync(path.join(root, 'target/site/pkg/atelier_bg.wasm'))) throw new Error('target/site is missing: run cargo run -p xtask -- build');
  const dataDir = mkdtempSync(path.join(tmpdir(), `atelier-${prefix}-`));
  const port = await freePort();
  const baseUrl = `http://127.0.0.1:${port}`;
  let log = '';
  const server = spawn(
    bin,
    ['serve', '--addr', `127.0.0.1:${port}`, '--data-dir', dataDir, '--model', path.join(root, 'models/starter'), '--site-root', path.join(root, 'target/site'), ...extraArgs],
    { cwd: root, env: { ...process.env, RUST_LOG: 'info' }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  server.stdout.on('data', (d) => (log += d));
  server.stderr.on('data', (d) => (log += d));
  await waitForHealth(baseUrl, server, 120_000);
  return {
    baseUrl,
    dataDir,
    log: () => log,
    async stop() {
      if (server.exitCode === null) {
        const exited = new Promise((r) => server.once('exit', r));
        server.kill('SIGTERM');
        await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
        if (server.exitCode === null) server.kill('SIGKILL');
      }
      rmSync(dataDir, { recursive: true, force: true });
      if (process.exitCode) console.error(log);
    },
  };
}

/** Headless Chromium with one page of `viewport`; page errors and console errors go to `errors`. */
export async function openBrowser(viewport = { width: 1200, height: 1100 }) {
  const browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-gpu'],
  });
  const page = await browser.newPage({ viewport });
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error') errors.push(m.text());
  });
  return { browser, page, errors };
}
