// Browser test of the Deployments page: a real `atelier serve` started with a deploy
// token, a registry version pushed into it through `POST /api/deployments/import` (as
// another studio's `atelier deploy create --to` does), then the page lists it, creates a
// deployment from its form (style and alias from the registry), and deletes it.
// Run with `node --test deployments.spec.mjs` after `cargo run -p xtask -- build`.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import path from 'node:path';
import { root, startStudio, openBrowser } from './support.mjs';

let studio;
let dataDir;
let browser;
let page;
let baseUrl;
let pageErrors = [];

before(async () => {
  studio = await startStudio('deploy-browser', ['--deploy-token', 't0ken']);
  ({ baseUrl, dataDir } = studio);

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

  ({ browser, page, errors: pageErrors } = await openBrowser({ width: 1200, height: 1000 }));
});

after(async () => {
  await browser?.close();
  await studio?.stop();
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
