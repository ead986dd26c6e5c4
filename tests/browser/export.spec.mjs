// Browser test of "Export for iOS/Mac": a real `atelier serve` (built-in starter model, the
// shipped styles, temp data dir, free port) driven by headless Chromium. On the Styles page,
// a style card's export form queues a Core ML export, shows its progress, then a download
// link whose file is a zip. Run after `cargo run -p xtask -- build`.
//
// Env: ATELIER_BIN, ATELIER_ROOT, CHROMIUM (default /usr/bin/chromium).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startStudio, openBrowser } from './support.mjs';

let studio;
let dataDir;
let browser;
let page;
let baseUrl;
let pageErrors = [];

before(async () => {
  studio = await startStudio('export', []);
  ({ baseUrl, dataDir } = studio);
  ({ browser, page, errors: pageErrors } = await openBrowser({ width: 1200, height: 1100 }));
});

after(async () => {
  await browser?.close();
  await studio?.stop();
});

test('a style card exports the style and offers the zip', async () => {
  await page.goto(`${baseUrl}/styles`);
  const card = page.locator('.style-card[data-name="pastel"]');
  await card.waitFor({ timeout: 60_000 });
  // The button works once the page has hydrated: click until the form opens.
  const form = card.locator('.export-coreml-form');
  const deadline = Date.now() + 60_000;
  while (!(await form.isVisible())) {
    assert.ok(Date.now() < deadline, 'the export form never opened');
    await card.locator('button.export-coreml-open').click();
    await page.waitForTimeout(300);
  }
  // A size the model cannot take is refused with the server's message, nothing queued.
  await form.locator('input.export-width').fill('100');
  await form.locator('button.export-coreml-submit').click();
  await card.locator('.export-coreml .error').waitFor({ timeout: 30_000 });
  assert.match(await card.locator('.export-coreml .error').textContent(), /width: 100 pixels is not a multiple of 8/);
  await form.locator('input.export-width').fill('');
  await form.locator('select').nth(1).selectOption('fp32');
  await form.locator('button.export-coreml-submit').click();

  await card.locator('.export-state', { hasText: /done:|failed:|cancelled/ }).waitFor({ timeout: 300_000 });
  const state = await card.locator('.export-state').textContent();
  assert.match(state, /done: .* zipped/);
  const link = card.locator('a.export-zip');
  const rows = await card.locator('table.export-packages tbody tr').allTextContents();
  assert.deepEqual(rows.map((r) => r.match(/^(TextEncoder|Unet|VAEDecoder|VAEEncoder)/)?.[1]), ['TextEncoder', 'Unet', 'VAEDecoder', 'VAEEncoder']);
  assert.ok(rows.every((r) => r.includes('fp32')), rows.join(' | '));
  assert.equal(await link.getAttribute('download'), 'Atelier-pastel-coreml.zip');

  const res = await fetch(new URL(await link.getAttribute('href'), baseUrl));
  assert.equal(res.status, 200);
  assert.equal(res.headers.get('content-type'), 'application/zip');
  assert.match(res.headers.get('content-disposition'), /attachment; filename="Atelier-pastel-coreml.zip"/);
  const body = Buffer.from(await res.arrayBuffer());
  assert.ok(body.length > 1000, `zip of ${body.length} bytes`);
  assert.equal(body.subarray(0, 2).toString('latin1'), 'PK');
  assert.ok(body.includes('Atelier-pastel-coreml/TextEncoder.mlpackage/Manifest.json'), 'the zip names the packages');
  assert.deepEqual(pageErrors.filter((e) => !/status of 400/.test(e)), []);
});
