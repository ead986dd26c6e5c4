// Browser test of the Deployments page: a real `atelier serve` started with a deploy
// token, a registry version pushed into it through `POST /api/deployments/import` (as
// another studio's `atelier deploy create --to` does), then the page lists it, creates a
// deployment from its form (style and alias from the registry), and deletes it.
// Run with `node --test deployments.spec.mjs` after `cargo run -p xtask -- build`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, existsSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';
import { root, serverBinary, freePort, waitForHealth } from './support.mjs';

let server;
let serverLog = '';
let dataDir;
let browser;
let page;
let baseUrl;
const pageErrors = [];

before(async () => {
  const bin = serverBinary();
  assert.ok(existsSync(bin), `${bin} is missing: run cargo run -p xtask -- build`);
  dataDir = mkdtempSync(path.join(tmpdir(), 'atelier-deploy-browser-'));
  const port = await freePort();
  baseUrl = `http://127.0.0.1:${port}`;
  server = spawn(
    bin,
    ['serve', '--addr', `127.0.0.1:${port}`, '--data-dir', dataDir, '--model', path.join(root, 'models/starter'), '--site-root', path.join(root, 'target/site'), '--deploy-token', 't0ken'],
    { cwd: root, env: { ...process.env, RUST_LOG: 'info' }, stdio: ['ignore', 'pipe', 'pipe'] },
  );
  server.stdout.on('data', (d) => (serverLog += d));
  server.stderr.on('data', (d) => (serverLog += d));
  await waitForHealth(baseUrl, server, 120_000);

  const model = await (await fetch(`${baseUrl}/api/model`)).json();
  const adapter = readFileSync(path.join(root, 'models/styles/inkline/inkline.safetensors')).toString('base64');
  const pushed = await fetch(`${baseUrl}/api/deployments/import`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: 'Bearer t0ken' },
    body: JSON.stringify({
      model: 'ink', kind: 'style', tags: { base_model_hash: model.hash }, alias: 'production', source: 'ink@1',
      files: [{ name: 'ink.safetensors', base64: adapter }],
      deployment: { name: 'pushed', weight: 0.8, defaults: { steps: 4 } },
    }),
  });
  assert.equal(pushed.status, 201, await pushed.text());

  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run', '--disable-gpu'],
  });
  page = await browser.newPage({ viewport: { width: 1200, height: 1000 } });
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error') pageErrors.push(m.text());
  });
});

after(async () => {
  await browser?.close();
  if (server && server.exitCode === null) {
    const exited = new Promise((r) => server.once('exit', r));
    server.kill('SIGTERM');
    await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
    if (server.exitCode === null) server.kill('SIGKILL');
  }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  if (process.exitCode) console.error(serverLog);
});

test('the Deployments page lists, creates and deletes deployments', async () => {
  await page.goto(`${baseUrl}/deployments`);
  await page.waitForSelector('tr[data-name="pushed"]', { timeout: 60_000 });
  assert.equal((await page.textContent('tr[data-name="pushed"] .serves')).trim(), 'ink@1');
  assert.ok(await page.isVisible('nav.top a[href="/deployments"]'));

  // The style and its alias come from the registry; the new deployment shows what it serves.
  await page.waitForSelector('select[name="selector"] option[value="production"]', { state: 'attached' });
  await page.fill('input[name="name"]', 'from-web');
  await page.fill('input[name="steps"]', '6');
  await page.click('form.deployment-form button[type=submit]');
  await page.waitForSelector('tr[data-name="from-web"]', { timeout: 30_000 });
  assert.equal((await page.textContent('tr[data-name="from-web"] .serves')).trim(), 'ink@1');
  const saved = await (await fetch(`${baseUrl}/api/deployments/from-web`)).json();
  assert.equal(saved.target, 'ink@production');
  assert.equal(saved.defaults.steps, 6);
  // Its quality monitoring measures a reference through it (8 images), shown live, then
  // the chart of scored images against the reference band.
  await page.waitForFunction(
    () => /Reference: 8 images of ink@1/.test(document.querySelector('tr.monitoring-row[data-name="from-web"] .reference-state')?.textContent ?? ''),
    null,
    { timeout: 120_000 },
  );
  // The pushed version carries no training Grams, so quality is charted and style is not.
  assert.equal(await page.locator('tr.monitoring-row[data-name="from-web"] svg.drift-chart g.panel.quality').count(), 1);
  const watch = await (await fetch(`${baseUrl}/api/deployments/from-web/monitoring`)).json();
  assert.equal(watch.reference.state, 'ready');
  assert.equal(watch.reference.samples.length, 8);

  // A refusal is shown, not swallowed.
  await page.fill('input[name="name"]', 'from-web');
  await page.click('form.deployment-form button[type=submit]');
  await page.waitForSelector('.deployments .error', { timeout: 30_000 });
  assert.match(await page.textContent('.deployments .error'), /exists/);

  await page.click('tr[data-name="from-web"] button.delete');
  await page.waitForSelector('tr[data-name="from-web"]', { state: 'detached', timeout: 30_000 });
  assert.equal((await fetch(`${baseUrl}/api/deployments/from-web`)).status, 404);
  // The refused create above is logged by the browser as a failed (400) load; nothing else.
  assert.deepEqual(pageErrors.filter((e) => !e.includes('status of 400')), []);
});
