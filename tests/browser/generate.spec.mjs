// Browser test: a real `atelier serve` (real engine, built-in model, temp data dir, free port)
// driven by headless Chromium. Run with `node --test generate.spec.mjs` after
// `cargo run -p xtask -- build`; `cargo run -p xtask -- test` and `.ci/run` do both.
//
// Env: ATELIER_BIN (server binary; default from `cargo metadata`), ATELIER_ROOT (repo root),
// CHROMIUM (default /usr/bin/chromium), SCREENSHOT (default /tmp/atelier-generate.png).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFileSync } from 'node:child_process';
import { writeFileSync, readFileSync, copyFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { root, serverBinary, startStudio, openBrowser } from './support.mjs';

const screenshot = process.env.SCREENSHOT ?? '/tmp/atelier-generate.png';


let studio;
let dataDir;
let browser;
let page;
let baseUrl;
let pageErrors = [];

before(async () => {
  studio = await startStudio('browser', [
    // The tiny model can finish 4 steps before the progress stream connects: slow steps
    // down so the step counter is observable.
    '--min-step-ms', '250',
  ]);
  ({ baseUrl, dataDir } = studio);
  ({ browser, page, errors: pageErrors } = await openBrowser({ width: 1200, height: 1100 }));
});

after(async () => {
  await browser?.close();
  await studio?.stop();
});

test('page hydrates and shows the built-in model note', async () => {
  await page.goto(baseUrl);
  await page.waitForSelector('.studio[data-ready="true"]', { timeout: 60_000 });
  const note = await page.textContent('.note');
  assert.match(note, /trained by Atelier itself/);
  assert.match(note, /a red circle on a blue background/);
  assert.match(await page.textContent('.gallery'), /No images yet/);
  assert.equal(await page.isDisabled('button[type=submit]'), false);
});

test('a bad size shows the server message', async () => {
  await page.fill('input[name=width]', '30');
  await page.click('button[type=submit]');
  const err = await page.waitForSelector('.error[role=alert]', { timeout: 30_000 });
  assert.match(await err.textContent(), /width.*multiple of 8/);
  await page.fill('input[name=width]', '64');
});

test('generate shows live progress, then the image in the gallery', async () => {
  await page.fill('textarea[name=prompt]', 'a red circle on a blue background');
  await page.fill('input[name=steps]', '4');
  // Record every step-counter text: the built-in model may finish faster than we could poll.
  await page.evaluate(() => {
    window.__seen = [];
    window.__previews = [];
    const record = () => {
      const el = document.querySelector('.step-counter');
      if (el && window.__seen.at(-1) !== el.textContent) window.__seen.push(el.textContent);
      const preview = document.querySelector('.progress img.preview');
      if (preview && window.__previews.at(-1) !== preview.getAttribute('src')) window.__previews.push(preview.getAttribute('src'));
    };
    new MutationObserver(record).observe(document.body, { subtree: true, childList: true, characterData: true, attributes: true });
  });
  await page.click('button[type=submit]');

  await page.waitForFunction(() => document.querySelector('.step-counter')?.textContent.startsWith('done'), null, { timeout: 120_000 });
  const seen = await page.evaluate(() => window.__seen);
  const steps = seen.filter((t) => /^step [1-4]\/4$/.test(t));
  assert.ok(steps.length >= 2, `the step counter did not advance: ${JSON.stringify(seen)}`);
  assert.equal(seen.at(-1), 'done: 1 image');
  assert.match(await page.getAttribute('.bar-fill', 'style'), /width: 100(\.0)?%/);
  assert.match(await page.textContent('.seed-used'), /^seed \d+$/);
  // While it ran, the panel showed the engine's intermediate previews (data: URLs); once done
  // it shows the finished image instead, the very one the gallery holds, never a stale preview.
  const previews = await page.evaluate(() => window.__previews);
  assert.ok(previews.length >= 1 && previews.every((src) => src.startsWith('data:image/png;base64,')), `previews while running: ${previews.length}`);
  assert.equal(await page.$$eval('.progress img.preview', (i) => i.length), 0, 'a finished job must not show its last latent preview');
  const result = await page.waitForSelector('.progress img.result', { timeout: 30_000 });
  const resultSrc = await result.getAttribute('src');
  assert.match(resultSrc, /^\/api\/images\/[0-9a-f-]+\.png$/);
  await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, result, { timeout: 30_000 });
  assert.equal(await result.evaluate((el) => el.naturalWidth), 64);

  const img = await page.waitForSelector('.cards .card img', { timeout: 30_000 });
  await page.waitForFunction((el) => el.complete && el.naturalWidth > 0, img, { timeout: 30_000 });
  assert.equal(await img.evaluate((el) => el.naturalWidth), 64);
  assert.equal(await img.getAttribute('src'), resultSrc, 'the panel shows the image the gallery got');
  assert.match(await page.textContent('.card .prompt'), /a red circle on a blue background/);
  await page.screenshot({ path: screenshot, fullPage: true });
});

test('reuse settings fills the form from a gallery image', async () => {
  const seedText = await page.textContent('.seed-used');
  await page.fill('textarea[name=prompt]', 'something else');
  await page.click('.card button.reuse');
  assert.equal(await page.inputValue('textarea[name=prompt]'), 'a red circle on a blue background');
  assert.equal(await page.inputValue('input[name=steps]'), '4');
  assert.equal(await page.isChecked('input[name=random_seed]'), false);
  assert.equal(`seed ${await page.inputValue('input[name=seed]')}`, seedText);
});

test('cancel stops a running job', async () => {
  await page.fill('input[name=steps]', '40');
  await page.click('button[type=submit]');
  await page.waitForFunction(() => /^step [1-9]\d*\/40$/.test(document.querySelector('.step-counter')?.textContent), null, { timeout: 30_000 });
  await page.click('button:has-text("Cancel")');
  await page.waitForFunction(() => document.querySelector('.step-counter')?.textContent === 'cancelled', null, { timeout: 30_000 });
  assert.equal(await page.$$eval('.progress img', (i) => i.length), 0, 'a cancelled job shows neither its last preview nor an image');
  assert.equal(await page.$$eval('.cards .card', (cards) => cards.length), 1, 'a cancelled job must not add an image');
  await page.fill('input[name=steps]', '4');
});

test('two browsers each follow their own job', async () => {
  const other = await browser.newPage();
  try {
    await other.goto(baseUrl);
    await other.waitForSelector('.studio[data-ready="true"]', { timeout: 60_000 });
    await other.fill('textarea[name=prompt]', 'second browser');
    await other.fill('input[name=steps]', '3');
    await other.uncheck('input[name=random_seed]');
    await other.fill('input[name=seed]', '777');
    await page.fill('textarea[name=prompt]', 'first browser');
    await page.fill('input[name=steps]', '3');
    await Promise.all([page.click('button[type=submit]'), other.click('button[type=submit]')]);
    for (const p of [page, other]) {
      await p.waitForFunction(() => document.querySelector('.step-counter')?.textContent.startsWith('done'), null, { timeout: 60_000 });
    }
    assert.equal(await other.textContent('.seed-used'), 'seed 777');
    assert.notEqual(await page.textContent('.seed-used'), 'seed 777');
    // Both images are in both galleries (the other page refreshed when its job finished).
    await other.reload();
    await other.waitForSelector('.studio[data-ready="true"]');
    const prompts = await other.$$eval('.card .prompt', (els) => els.map((e) => e.textContent));
    assert.ok(prompts.includes('first browser') && prompts.includes('second browser'), JSON.stringify(prompts));
  } finally {
    await other.close();
  }
});

test('the styles page shows the shipped styles, their comparisons and downloads', async () => {
  await page.click('nav.top a[href="/styles"]');
  await page.waitForSelector('.style-card[data-name="pastel"] img.compare', { timeout: 30_000 });
  const names = await page.$$eval('.style-card', (els) => els.map((e) => e.dataset.name));
  assert.deepEqual(names, ['frame', 'inkline', 'pastel']);
  await page.waitForFunction(
    () => [...document.querySelectorAll('img.compare')].every((i) => i.complete && i.naturalWidth > 0),
    null,
    { timeout: 30_000 },
  );
  assert.equal(await page.$$eval('.style-card .badge', (b) => b.length), 3, 'all three are marked shipped');
  assert.equal(await page.$$eval('.style-card button.delete', (b) => b.length), 0, 'shipped styles cannot be deleted');
  assert.match(await page.textContent('.style-card[data-name="pastel"] .similarity'), /style similarity 0\.\d+ \(base model\) → 0\.\d+/);
  const href = await page.getAttribute('.style-card[data-name="inkline"] a.download', 'href');
  assert.equal(href, '/api/styles/inkline/files/adapter.safetensors');
  const res = await page.request.get(baseUrl + href);
  assert.equal(res.status(), 200);
  assert.ok((await res.body()).length > 100_000, 'the adapter file downloads');
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-styles.png'), fullPage: true });
});

test('the train page uploads images, reports them, trains live, stops, resumes and lands in the library', async () => {
  // A small generated dataset, a corrupt PNG and a copy of the first image.
  const images = path.join(dataDir, 'upload-src');
  execFileSync(serverBinary(), ['style-data', '--style', 'pastel', '--out', images, '--count', '10', '--seed', '5'], { cwd: root });
  writeFileSync(path.join(images, 'broken.png'), readFileSync(path.join(images, '003.png')).subarray(0, 300));
  copyFileSync(path.join(images, '000.png'), path.join(images, 'again.png'));
  const files = readdirSync(images).map((f) => path.join(images, f));

  await page.click('nav.top a[href="/train"]');
  await page.waitForSelector('.train[data-ready="true"]', { timeout: 60_000 });
  await page.setInputFiles('#train-files', files);
  await page.waitForSelector('.dataset-report[data-usable="true"]', { timeout: 60_000 });
  const count = Number(await page.getAttribute('.dataset-report', 'data-images'));
  assert.ok(count >= 5 && count <= 10, `usable images: ${count}`);
  assert.equal(await page.$$eval('.dataset-report .thumbs img', (i) => i.length), count);
  await page.waitForFunction(() => [...document.querySelectorAll('.thumbs img')].every((i) => i.complete && i.naturalWidth > 0), null, { timeout: 30_000 });
  const skipped = await page.textContent('.dataset-report .skipped');
  assert.match(skipped, /broken\.png.*cannot be decoded/s);
  assert.match(skipped, /again\.png.*near-duplicate of 000\.png/s);
  // The upload is DVC version 1 with its files as added; a caption edit makes version 2.
  await page.waitForSelector('.dataset-versions li[data-version="1"]', { timeout: 30_000 });
  assert.equal(await page.$$eval('.version-diff .diff-group.added img', (i) => i.length), files.filter((f) => !f.endsWith('.txt')).length);
  page.once('dialog', (d) => d.accept('pastel hills, edited on the page'));
  await page.click('.dataset-report .thumbs li:first-child button.caption-edit');
  await page.waitForSelector('.dataset-versions li[data-version="2"]', { timeout: 30_000 });
  assert.match(await page.textContent('.dataset-versions li[data-version="2"] .summary'), /1 caption changed/);
  assert.match(await page.textContent('.version-diff .captions-changed'), /pastel hills, edited on the page/);

  await page.fill('#style-name', 'browserpastel');
  await page.fill('#style-trigger', 'pastel');
  await page.fill('#style-steps', '150');
  await page.fill('#style-batch', '2');
  await page.click('button.start');
  const card = '.training[data-name="browserpastel"]';
  // Live progress over the event stream: the step counter moves and the loss chart appears.
  await page.waitForSelector(`${card}[data-state="running"]`, { timeout: 60_000 });
  await page.waitForFunction((sel) => {
    const m = document.querySelector(`${sel} .step-counter`)?.textContent.match(/step (\d+)\/150/);
    return m && Number(m[1]) >= 10;
  }, card, { timeout: 60_000 });
  await page.waitForSelector(`${card} .loss-chart polyline.raw`);
  await page.click(`${card} button.stop`);
  await page.waitForSelector(`${card}[data-state="stopped"]`, { timeout: 60_000 });
  const stoppedAt = Number((await page.textContent(`${card} .step-counter`)).match(/step (\d+)\//)[1]);
  assert.ok(stoppedAt >= 10 && stoppedAt < 150, `stopped at ${stoppedAt}`);
  assert.match(await page.textContent(`${card} .training-note`), /checkpoint/);

  await page.click(`${card} button.resume`);
  await page.waitForSelector(`${card}[data-state="done"]`, { timeout: 180_000 });
  assert.match(await page.textContent(`${card} .step-counter`), /step 150\/150/);
  assert.match(await page.textContent(`${card} .done code`), /<lora:browserpastel:0\.8> pastel/);
  await page.waitForFunction((sel) => {
    const img = document.querySelector(`${sel} img.sample`);
    return img && img.complete && img.naturalWidth > 0 && /step 150/.test(img.alt);
  }, card, { timeout: 30_000 });
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-train.png'), fullPage: true });

  // The new style is in the library, deletable, with its comparison.
  await page.click(`${card} a.open-style`);
  await page.waitForSelector('.style-card[data-name="browserpastel"] img.compare', { timeout: 30_000 });
  assert.equal(await page.$$eval('.style-card[data-name="browserpastel"] button.delete', (b) => b.length), 1);
});

test('the blend page previews instantly, renders exactly, and its link reproduces the image elsewhere', async () => {
  await page.click('nav.top a[href="/blend"]');
  await page.waitForSelector('.blend[data-ready="true"]', { timeout: 60_000 });
  await page.fill('#blend-seed', '3');
  await page.locator('#blend-seed').dispatchEvent('change');
  await page.locator('.blend input[type=number][max="150"]').fill('4');
  await page.locator('.blend input[type=number][max="150"]').dispatchEvent('change');
  await page.check('.style-picker input[data-style="inkline"]');
  await page.check('.style-picker input[data-style="pastel"]');
  // The anchors (each style alone) arrive, then the preview is drawn in the browser.
  await page.waitForFunction(() => Number(document.querySelector('.blend').dataset.previewUpdates) >= 1, null, { timeout: 60_000 });
  const canvas = () => page.$eval('#blend-preview', (c) => c.toDataURL());
  const before = await canvas();
  const updates = Number(await page.getAttribute('.blend', 'data-preview-updates'));
  await page.fill('.weight[data-style="inkline"] input.slider', '1.8');
  await page.waitForFunction((n) => Number(document.querySelector('.blend').dataset.previewUpdates) > n, updates, { timeout: 2_000 });
  assert.notEqual(await canvas(), before, 'the preview follows the slider at once');
  assert.equal(await page.textContent('.weight[data-style="inkline"] .value'), '0.78');
  // Then the exact render of the resting blend.
  await page.waitForFunction(() => {
    const img = document.querySelector('img.exact');
    return img && img.complete && img.naturalWidth > 0 && !/rendering/.test(document.querySelector('.blend-views figure:nth-child(2) figcaption').textContent);
  }, null, { timeout: 60_000 });
  await page.waitForTimeout(600);
  const src = await page.getAttribute('img.exact', 'src');
  assert.ok((await page.$$('.strip-item')).length >= 1, 'exact renders collect in the strip');
  // The 2-D pad: its weights are computed in WASM by the same code the server uses.
  const box = await (await page.$('.pad')).boundingBox();
  await page.mouse.click(box.x + box.width * 0.25, box.y + box.height / 2);
  await page.waitForFunction(() => document.querySelector('.weight[data-style="inkline"] .value').textContent === '0.75', null, { timeout: 5_000 });
  assert.equal(await page.textContent('.weight[data-style="pastel"] .value'), '0.25');
  await page.mouse.click(box.x + box.width - 1, box.y + 5);
  await page.waitForFunction(() => document.querySelector('.weight[data-style="pastel"] .value').textContent === '1.00', null, { timeout: 5_000 });
  // Benchmark: the WASM preview update, median over many slider moves.
  for (let i = 0; i < 30; i++) await page.fill('.weight[data-style="pastel"] input.slider', String(0.2 + i * 0.03));
  const median = Number(await page.getAttribute('.blend', 'data-preview-median-ms'));
  console.log(`BENCH blend preview update in WASM: median ${median} ms over ${await page.getAttribute('.blend', 'data-preview-updates')} updates`);
  assert.ok(median < 50, `preview update ${median} ms`);
  await page.fill('.weight[data-style="pastel"] input.slider', '0.5');
  await page.waitForFunction((old) => {
    const img = document.querySelector('img.exact');
    return img && img.getAttribute('src') !== old && img.complete && img.naturalWidth > 0;
  }, src, { timeout: 60_000 });
  await page.waitForTimeout(600);
  const finalSrc = await page.getAttribute('img.exact', 'src');
  const link = await page.inputValue('#blend-link');
  assert.match(link, /\/blend\?b=[A-Za-z0-9_-]+$/);

  // A fresh browser context opens the link to the same blend and the identical image.
  const other = await browser.newContext();
  try {
    const p2 = await other.newPage();
    await p2.goto(link);
    await p2.waitForSelector('.blend[data-ready="true"]', { timeout: 60_000 });
    assert.equal(await p2.isChecked('.style-picker input[data-style="inkline"]'), true);
    await p2.waitForFunction(() => { const i = document.querySelector('img.exact'); return i && i.complete && i.naturalWidth > 0; }, null, { timeout: 60_000 });
    const a = await (await page.request.get(baseUrl + finalSrc)).body();
    const b = await (await p2.request.get(baseUrl + (await p2.getAttribute('img.exact', 'src')))).body();
    assert.ok(a.equals(b), 'the shared link renders the identical image');
    // A tampered link gets a clear message, not a crash.
    await p2.goto(link.slice(0, -4) + 'AAAA');
    await p2.waitForSelector('.link-error', { timeout: 30_000 });
    assert.match(await p2.textContent('.link-error'), /damaged or cut off/);
  } finally {
    await other.close();
  }
  // Baking is a queued task: live progress under the buttons, then a download link whose
  // file is a LoRA (safetensors header first).
  await page.click('button.bake >> text=compressed to rank 8');
  await page.waitForSelector('.bake-state a.download', { timeout: 60_000 });
  assert.match(await page.textContent('.bake-state'), /done: rank 8, [0-9.]+ % of the blend lost/);
  const baked = await (await page.request.get(baseUrl + (await page.getAttribute('.bake-state a.download', 'href')))).body();
  const headerLen = Number(baked.readBigUInt64LE(0));
  assert.ok(JSON.parse(baked.subarray(8, 8 + headerLen).toString()).__metadata__.atelier_blend, 'the bake records its blend');
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-blend.png'), fullPage: true });
});

test('a blend whose style is missing names it and imports it from the sharing studio', async () => {
  // The style trained above, as another studio ("sharer.test", simulated) would serve it.
  const styles = await (await page.request.get(`${baseUrl}/api/styles`)).json();
  const mine = styles.find((s) => s.name === 'browserpastel');
  assert.ok(mine && mine.hash, 'the style trained above is in the library');
  const file = await (await page.request.get(`${baseUrl}/api/styles/by-hash/${mine.hash}`)).body();
  await page.goto(`${baseUrl}/blend`);
  await page.waitForSelector('.blend[data-ready="true"]', { timeout: 60_000 });
  await page.check('.style-picker input[data-style="browserpastel"]');
  await page.check('.style-picker input[data-style="inkline"]');
  const link = await page.inputValue('#blend-link');
  const code = link.split('b=')[1];
  assert.equal((await page.request.delete(`${baseUrl}/api/styles/browserpastel`)).status(), 204);

  await page.route('http://sharer.test/api/styles/by-hash/*', (route) =>
    route.fulfill({ status: 200, body: file, headers: { 'Content-Type': 'application/octet-stream', 'Access-Control-Allow-Origin': '*' } }));
  try {
    await page.goto(`${baseUrl}/blend`);
    await page.waitForSelector('.blend[data-ready="true"]', { timeout: 60_000 });
    await page.fill('#open-link', `http://sharer.test/blend?b=${code}`);
    await page.locator('#open-link').dispatchEvent('change');
    await page.waitForSelector(`.missing li[data-hash="${mine.hash}"]`, { timeout: 30_000 });
    assert.match(await page.textContent('.missing'), new RegExp(`browserpastel \\(hash ${mine.hash}\\)`));
    await page.click('.missing button.import');
    // After the import the page reloads with the style in place and renders the blend.
    await page.waitForSelector('.style-picker input[data-style="browserpastel"]:checked', { timeout: 60_000 });
    assert.equal(await page.$$eval('.missing', (m) => m.length), 0);
    await page.waitForFunction(() => { const i = document.querySelector('img.exact'); return i && i.complete && i.naturalWidth > 0; }, null, { timeout: 60_000 });
  } finally {
    await page.unroute('http://sharer.test/api/styles/by-hash/*');
  }
});

test('the negatives page analyses, optimises live, compares before/after and adopts the winner', async () => {
  await page.click('nav.top a[href="/negatives"]');
  await page.waitForSelector('#neg-run:not([disabled])', { timeout: 60_000 });
  await page.fill('#neg-prompt', 'a green square on a white background');
  // A contradiction is explained as soon as it is typed.
  await page.fill('#neg-baseline', 'white');
  await page.waitForSelector('.contradiction[data-word="white"]', { timeout: 10_000 });
  assert.match(await page.textContent('.contradiction'), /in the prompt and in the negative/);
  await page.fill('#neg-baseline', '');
  await page.waitForFunction(() => document.querySelectorAll('.contradiction').length === 0, null, { timeout: 10_000 });
  assert.equal(await page.textContent('.cues .subject'), 'square');
  const suggestions = await page.$$eval('.suggestion .negative', (s) => s.map((e) => e.textContent));
  assert.ok(suggestions.includes('low contrast'), suggestions.join(' | '));
  // The knowledge base is edited on the page: a bad edit is refused, a good one feeds the suggestions.
  await page.click('details.knowledge summary');
  await page.waitForFunction(() => document.querySelector('#neg-knowledge').value.includes('"image quality"'), null, { timeout: 10_000 });
  await page.fill('#neg-knowledge', '{ "categories": [ ');
  await page.click('#neg-knowledge-save');
  assert.match(await page.textContent('.knowledge-note'), /not valid JSON/);
  const kb = { categories: [{ name: 'image quality', kind: 'quality', cues: [], negatives: ['grainy', 'blurry', 'noisy', 'low contrast'] }] };
  await page.fill('#neg-knowledge', JSON.stringify({ categories: [{ ...kb.categories[0], kind: 'subject' }] }));
  await page.click('#neg-knowledge-save');
  await page.waitForFunction(() => /needs cue words/.test(document.querySelector('.knowledge-note')?.textContent ?? ''), null, { timeout: 10_000 });
  await page.fill('#neg-knowledge', JSON.stringify(kb));
  await page.click('#neg-knowledge-save');
  await page.waitForFunction(() => /^saved/.test(document.querySelector('.knowledge-note')?.textContent ?? ''), null, { timeout: 10_000 });
  await page.fill('#neg-prompt', 'a green square on a white background ');
  await page.waitForFunction(() => [...document.querySelectorAll('.suggestion .negative')].map((e) => e.textContent).join('|') === 'grainy|blurry|noisy|low contrast', null, { timeout: 10_000 });
  // A suggestion can be added to the own candidates in one click.
  await page.click('.suggestion:has(.negative:text-is("low contrast")) button');
  assert.equal(await page.inputValue('#neg-own'), 'low contrast');
  await page.fill('#neg-own', 'low contrast\non the left, on the right');
  for (const [id, v] of [['#neg-candidates', '0'], ['#neg-seeds', '2'], ['#neg-holdout', '1'], ['#neg-steps', '8']]) {
    await page.fill(id, v);
    await page.locator(id).dispatchEvent('change');
  }
  await page.click('#neg-run');
  // Live progress, then the verdict.
  await page.waitForFunction(() => /\d+ of 8 images/.test(document.querySelector('.neg-progress .step-counter')?.textContent ?? ''), null, { timeout: 30_000 });
  await page.waitForSelector('.verdict', { timeout: 120_000 });
  assert.match(await page.textContent('.verdict'), /^“low contrast” raises the combined score by \+0\.\d+ on 1 new seeds/);
  assert.equal(await page.textContent('table.candidates tr.winner td'), 'low contrast');
  assert.equal(await page.$$eval('.cand-chart rect.bar-rect', (r) => r.length), 2);
  assert.equal(await page.$$eval('.cand-chart rect.winner', (r) => r.length), 1);
  // Baseline and winner side by side for the 2 search seeds and the new one, all loaded.
  await page.waitForFunction(() => {
    const imgs = [...document.querySelectorAll('.pair img, .wipe img')];
    return imgs.length === 8 && imgs.every((i) => i.complete && i.naturalWidth === 64);
  }, null, { timeout: 10_000 });
  assert.equal(await page.$$eval('.pair.held-out', (p) => p.length), 1);
  assert.match(await page.textContent('.metric-deltas'), /contrast \+0\.\d+/);
  // The wipe slider uncovers the winner.
  await page.fill('#neg-wipe', '10');
  assert.equal(await page.$eval('.wipe-before', (i) => i.style.clipPath), 'inset(0px 90% 0px 0px)');
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-negatives.png'), fullPage: true });
  // Adopt: the Generate page opens with the prompt and the winning negative filled in.
  await page.click('a.adopt');
  await page.waitForSelector('textarea[name="negative_prompt"]');
  await page.waitForFunction(() => document.querySelector('textarea[name="negative_prompt"]').value === 'low contrast', null, { timeout: 10_000 });
  assert.equal(await page.inputValue('textarea[name="prompt"]'), 'a green square on a white background');
});

test('a running optimisation can be cancelled from the page', async () => {
  await page.goto(`${baseUrl}/negatives`);
  await page.waitForSelector('#neg-run:not([disabled])', { timeout: 60_000 });
  await page.fill('#neg-seeds', '16');
  await page.locator('#neg-seeds').dispatchEvent('change');
  await page.click('#neg-run');
  await page.waitForSelector('#neg-cancel', { timeout: 10_000 });
  await page.click('#neg-cancel');
  await page.waitForFunction(() => /^cancelled after \d+ images/.test(document.querySelector('.neg-progress .step-counter')?.textContent ?? ''), null, { timeout: 30_000 });
  assert.equal(await page.$$eval('#neg-cancel', (b) => b.length), 0);
});

test('the experiments page lists tracked runs and narrows them with an MLflow filter', async () => {
  await page.goto(`${baseUrl}/experiments`);
  await page.waitForSelector('.experiments[data-ready="true"]', { timeout: 60_000 });
  await page.click('.exp-list button[data-experiment="styles"]');
  await page.waitForSelector('table.runs tbody tr', { timeout: 30_000 });
  const names = await page.$$eval('table.runs tbody tr td:nth-child(2)', (tds) => tds.map((t) => t.textContent));
  assert.ok(names.includes('browserpastel'), `the style trained above is a run: ${names.join(', ')}`);
  assert.ok(await page.$('table.runs th.param'), 'a column per param');
  await page.fill('#run-filter', "params.rank = 'no-such-rank'");
  await page.press('#run-filter', 'Enter');
  await page.waitForFunction(() => document.querySelector('.run-count')?.textContent === '0 runs', null, { timeout: 10_000 });
  await page.fill('#run-filter', 'metrics.loss >');
  await page.press('#run-filter', 'Enter');
  await page.waitForSelector('.filter-error', { timeout: 10_000 });
  assert.match(await page.textContent('.filter-error'), /at character 15: expected a value/);
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-experiments.png'), fullPage: true });
});

test('the styles page promotes a registered version with an alias that prompts can use', async () => {
  await page.goto(`${baseUrl}/styles`);
  const panel = '.registry[data-style="browserpastel"]';
  await page.waitForSelector(`${panel} .version-row[data-version="1"]`, { timeout: 60_000 });
  assert.match(await page.textContent(`${panel} summary`), /1 version$/);
  assert.equal(await page.inputValue(`${panel} .alias-name`), 'production');
  await page.click(`${panel} .set-alias button[type=submit]`);
  await page.waitForSelector(`${panel} .version-row[data-version="1"] .badge.alias[data-alias="production"]`, { timeout: 10_000 });
  const model = await (await page.request.get(`${baseUrl}/api/registry/browserpastel`)).json();
  assert.deepEqual(model.aliases, { production: 1 });
  // A prompt names the version through its alias.
  const res = await page.request.post(`${baseUrl}/api/generate`, { data: { prompt: 'a red circle <lora:browserpastel@production:0.8>', steps: 2 } });
  assert.equal(res.status(), 202, await res.text());
  const bad = await page.request.post(`${baseUrl}/api/generate`, { data: { prompt: 'a red circle <lora:browserpastel@staging>', steps: 2 } });
  assert.equal(bad.status(), 400);
  assert.match((await bad.json()).error, /browserpastel has no version staging \(known: 1, production\)/);
  // A bad alias is refused with the rule; the alias survives a reload; × removes it.
  await page.fill(`${panel} .alias-name`, 'v2');
  await page.click(`${panel} .set-alias button[type=submit]`);
  await page.waitForSelector(`${panel} p.error`, { timeout: 10_000 });
  assert.match(await page.textContent(`${panel} p.error`), /not an alias/);
  await page.reload();
  await page.waitForSelector(`${panel} .badge.alias[data-alias="production"]`, { timeout: 60_000 });
  await page.click(`${panel} .badge.alias[data-alias="production"] button.remove-alias`);
  await page.waitForFunction((sel) => !document.querySelector(sel), `${panel} .badge.alias`, { timeout: 10_000 });
  assert.deepEqual((await (await page.request.get(`${baseUrl}/api/registry/browserpastel`)).json()).aliases, {});
});

// Seeds runs with `atelier runs seed` into the studio's store while it runs (SQLite WAL:
// another process may write). Resolves once the finished runs are written (and, with
// `live`, the live run has started); the child keeps logging the live run.
function seedRuns(args) {
  const child = spawn(serverBinary(), ['runs', 'seed', '--tracking', path.join(dataDir, 'tracking'), ...args], { cwd: root, stdio: ['ignore', 'pipe', 'pipe'] });
  let out = '';
  const ready = new Promise((resolve, reject) => {
    const wanted = args.includes('--live') ? /live run [0-9a-f]+:/ : /seeded \d+ run/;
    child.stdout.on('data', (d) => {
      out += d;
      if (wanted.test(out)) resolve(out);
    });
    child.stderr.on('data', (d) => (out += d));
    child.on('exit', (code) => (code === 0 && wanted.test(out) ? resolve(out) : reject(new Error(`atelier runs seed failed (${code}): ${out}`))));
  });
  return { child, ready };
}

// The run ids of the table's rows by run name.
async function runIdsByName(p) {
  return Object.fromEntries(await p.$$eval('table.runs tbody tr', (trs) => trs.map((tr) => [tr.children[1].textContent, tr.dataset.run])));
}

async function curvePoints(p) {
  return Object.fromEntries(await p.$$eval('svg.metric-chart path.curve', (ps) => ps.map((e) => [e.dataset.run, Number(e.dataset.points)])));
}

test('the dashboard compares ticked runs: curves, params diff, CSV, live growth, a link that restores it', async () => {
  const seeded = seedRuns(['--experiment', 'dash', '--runs', '3', '--metrics', '2', '--steps', '60', '--seed', '3', '--live', '30']);
  try {
    await seeded.ready;
    await page.goto(`${baseUrl}/experiments?experiment=dash`);
    await page.waitForSelector('.experiments[data-ready="true"]', { timeout: 60_000 });
    await page.waitForFunction(() => document.querySelector('.run-count')?.textContent === '4 runs', null, { timeout: 30_000 });
    const ids = await runIdsByName(page);
    assert.deepEqual(Object.keys(ids).sort(), ['seed-0000', 'seed-0001', 'seed-0002', 'seed-live']);

    // The filter narrows the table, and an empty one shows every run again.
    await page.fill('#run-filter', "params.seed = '1'");
    await page.press('#run-filter', 'Enter');
    await page.waitForFunction(() => document.querySelector('.run-count')?.textContent === '1 run', null, { timeout: 10_000 });
    assert.deepEqual(Object.keys(await runIdsByName(page)), ['seed-0001']);
    await page.fill('#run-filter', '');
    await page.press('#run-filter', 'Enter');
    await page.waitForFunction(() => document.querySelector('.run-count')?.textContent === '4 runs', null, { timeout: 10_000 });

    // Columns sort by their header, numbers numerically.
    await page.click('table.runs th[data-col="params.seed"]');
    await page.waitForFunction(() => document.querySelector('table.runs tbody tr td:nth-child(2)')?.textContent === 'seed-0000', null, { timeout: 10_000 });
    await page.click('table.runs th[data-col="params.seed"]');
    await page.waitForFunction(() => document.querySelector('table.runs tbody tr td:nth-child(2)')?.textContent === 'seed-live', null, { timeout: 10_000 });

    // Two ticked runs: two curves of 60 points each, and their params side by side.
    await page.check(`tr[data-run="${ids['seed-0000']}"] input.pick-run`);
    await page.check(`tr[data-run="${ids['seed-0001']}"] input.pick-run`);
    await page.waitForFunction(() => document.querySelectorAll('svg.metric-chart path.curve').length === 2, null, { timeout: 20_000 });
    assert.deepEqual(await curvePoints(page), { [ids['seed-0000']]: 60, [ids['seed-0001']]: 60 });
    assert.equal(await page.$eval('#metric-pick', (s) => s.value), 'loss');
    assert.ok(await page.$('table.params-diff tr.differs[data-param="seed"]'), 'the seed param differs');
    const same = await page.$$eval('table.params-diff tr:not(.differs)', (trs) => trs.map((t) => t.dataset.param));
    for (const p of same) assert.notEqual(p, 'seed');

    // Hovering shows the step and each run's value.
    const box = await page.$eval('svg.metric-chart', (e) => { const r = e.getBoundingClientRect(); return { x: r.x, y: r.y, w: r.width, h: r.height }; });
    await page.mouse.move(box.x + box.w * 0.5, box.y + box.h * 0.5);
    await page.waitForSelector('svg.metric-chart .hover .hover-step', { timeout: 5_000 });
    assert.match(await page.textContent('svg.metric-chart .hover .hover-step'), /^step \d+$/);
    assert.equal(await page.$$eval('svg.metric-chart .hover text', (t) => t.length), 3, 'the step and a value per run');

    // Smoothing and the log scale redraw the same number of points.
    await page.$eval('#smoothing', (e) => { e.value = '0.9'; e.dispatchEvent(new Event('input', { bubbles: true })); });
    await page.check('#log-scale');
    await page.waitForFunction(() => document.querySelector('.smoothing-value')?.textContent === '0.90', null, { timeout: 5_000 });
    assert.deepEqual(Object.values(await curvePoints(page)), [60, 60]);

    // The address holds the comparison.
    await page.waitForFunction((want) => location.search.includes(want), `runs=${ids['seed-0000']},${ids['seed-0001']}`, { timeout: 5_000 });
    const link = page.url();
    assert.match(link, /experiment=dash/);
    assert.match(link, /metric=loss/);

    // The CSV downloads: the runs table (a header and a row per run) and a curve.
    const csvHref = await page.$eval('a.csv-runs', (a) => a.href);
    const csv = await page.evaluate(async (u) => { const r = await fetch(u); return { type: r.headers.get('content-type'), text: await r.text() }; }, csvHref);
    assert.match(csv.type, /^text\/csv/);
    const rows = csv.text.split('\r\n').filter((l) => l !== '');
    assert.equal(rows.length, 1 + 4, csv.text.slice(0, 300));
    assert.match(rows[0], /^run_id,name,status,start_time,params\.lr,params\.optimizer,params\.rank,params\.seed,metrics\.loss,metrics\.val_loss$/);
    const metricHref = await page.$eval(`ul.legend li[data-run="${ids['seed-0000']}"] a.csv-metric`, (a) => a.href);
    const metricCsv = await page.evaluate(async (u) => (await fetch(u)).text(), metricHref);
    assert.equal(metricCsv.split('\r\n').filter((l) => l !== '').length, 61);

    // The live run's curve grows as points are logged.
    await page.check(`tr[data-run="${ids['seed-live']}"] input.pick-run`);
    const live = `svg.metric-chart path.curve[data-run="${ids['seed-live']}"]`;
    await page.waitForSelector(live, { timeout: 20_000 });
    const before = Number(await page.getAttribute(live, 'data-points'));
    await page.waitForFunction(
      ([sel, n]) => Number(document.querySelector(sel)?.dataset.points) >= n + 5,
      [live, before],
      { timeout: 15_000 },
    );
    await page.screenshot({ path: screenshot.replace(/\.png$/, '-dashboard.png'), fullPage: true });

    // Opening the link elsewhere restores the comparison.
    const other = await browser.newPage({ viewport: { width: 1200, height: 1100 } });
    try {
      await other.goto(link);
      await other.waitForFunction(() => document.querySelectorAll('svg.metric-chart path.curve').length === 2, null, { timeout: 30_000 });
      assert.deepEqual(await curvePoints(other), { [ids['seed-0000']]: 60, [ids['seed-0001']]: 60 });
      const checked = await other.$$eval('input.pick-run:checked', (cs) => cs.map((c) => c.dataset.run).sort());
      assert.deepEqual(checked, [ids['seed-0000'], ids['seed-0001']].sort());
      assert.equal(await other.$eval('#metric-pick', (s) => s.value), 'loss');
    } finally {
      await other.close();
    }

    // When the live run ends, its status in the table follows, and its curve holds every
    // point it logged, each once.
    await page.waitForSelector(`tr[data-run="${ids['seed-live']}"] td.status.finished`, { timeout: 60_000 });
    const logged = await page.evaluate(async (u) => (await fetch(u)).text(), `/api/runs/${ids['seed-live']}/metrics/loss.csv`);
    assert.equal(Number(await page.getAttribute(live, 'data-points')), logged.split('\r\n').filter((l) => l !== '').length - 1);
  } finally {
    if (seeded.child.exitCode === null) seeded.child.kill('SIGTERM');
  }
});

test('the overview shows styles, negative prompts and bench over commits; sample sheets follow a step slider; artifacts download', async () => {
  // Two bench invocations recorded by the binary (a parent and a child per attention each).
  for (let i = 0; i < 2; i++) {
    execFileSync(serverBinary(), ['bench', '--case', 'starter-unet', '--steps', '1', '--tracking', path.join(dataDir, 'tracking')], { cwd: root, stdio: 'pipe' });
  }
  const styleRuns = await (await page.request.get(`${baseUrl}/api/experiments/styles/runs`)).json();
  const trained = styleRuns.filter((r) => r.name === 'browserpastel' && r.metrics.similarity_gain !== undefined);
  assert.ok(trained.length >= 1, `browserpastel has a similarity gain: ${JSON.stringify(styleRuns.map((r) => [r.name, r.metrics]))}`);
  const benchRuns = await (await page.request.get(`${baseUrl}/api/experiments/bench/runs`)).json();
  const children = benchRuns.filter((r) => r.params.case === 'starter-unet');
  const attentions = [...new Set(children.map((r) => r.params.attention))].sort();
  assert.ok(attentions.length >= 1 && children.length === 2 * attentions.length, `a child per attention per invocation: ${children.length}`);

  await page.goto(`${baseUrl}/experiments`);
  await page.waitForSelector('.experiments[data-ready="true"]', { timeout: 60_000 });
  await page.waitForSelector('.overview[data-ready="true"]', { timeout: 30_000 });
  // (a) The style trained above, with its similarity gain (the run's latest value).
  const bars = await page.$$eval('svg.style-gains rect.gain-bar', (rs) => rs.map((r) => [r.dataset.name, Number(r.dataset.value)]));
  for (const r of trained) assert.ok(bars.some(([n, v]) => n === 'browserpastel' && v === r.metrics.similarity_gain), `${r.metrics.similarity_gain} in ${JSON.stringify(bars)}`);
  assert.equal(bars.length, styleRuns.filter((r) => r.metrics.similarity_gain !== undefined).length);
  // Drawn at the height the chart gives it (no page style overrides the SVG geometry).
  const drawn = await page.$eval('svg.style-gains rect.gain-bar[data-name="browserpastel"]', (r) => {
    const svg = r.ownerSVGElement.getBoundingClientRect();
    return { px: r.getBoundingClientRect().height, want: r.height.baseVal.value * svg.width / 800 };
  });
  assert.ok(drawn.want > 1 && Math.abs(drawn.px / drawn.want - 1) < 0.05, JSON.stringify(drawn));
  // (b) A bar per negative-prompt run with a held-out gain (or the hint when there is none).
  const negRuns = await (await page.request.get(`${baseUrl}/api/experiments/negative-prompts/runs`)).json();
  const withDelta = negRuns.filter((r) => r.metrics.holdout_mean_delta !== undefined);
  const negBars = await page.$$eval('svg.negative-gains rect.gain-bar', (rs) => rs.map((r) => Number(r.dataset.value)));
  assert.deepEqual(negBars.sort(), withDelta.map((r) => r.metrics.holdout_mean_delta).sort());
  if (withDelta.length === 0) assert.match(await page.textContent('.negatives-part'), /No negative-prompt runs yet/);
  // (c) A bench line per attention with a point per invocation, labelled with the commit.
  const lines = await page.$$eval('svg.bench-chart path.bench-line', (ps) => ps.map((p) => [p.dataset.series, Number(p.dataset.points)]));
  assert.deepEqual(lines.sort(), attentions.map((a) => [`starter-unet ${a}`, 2]));
  const commit = (children[0].tags['atelier.commit'] ?? '?').slice(0, 7);
  const dots = await page.$$eval('svg.bench-chart circle[data-commit]', (cs) => cs.map((c) => c.dataset.commit));
  assert.equal(dots.length, 2 * attentions.length);
  assert.ok(dots.every((c) => c === commit), `${dots} labelled ${commit}`);
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-overview.png'), fullPage: true });

  // Sample sheets: the trained style's run with the most sheets, ticked, under the slider.
  const details = await Promise.all(trained.map(async (r) => (await page.request.get(`${baseUrl}/api/runs/${r.run_id}`)).json()));
  const sheetSteps = (d) => [...new Set(d.artifacts.map((a) => a.match(/^images\/samples\+step\+(\d+)\+/)).filter(Boolean).map((m) => Number(m[1])))].sort((a, b) => a - b);
  const run = details.reduce((a, b) => (sheetSteps(b).length > sheetSteps(a).length ? b : a));
  const steps = sheetSteps(run);
  assert.ok(steps.length >= 2, `sheets at several steps: ${steps}`);
  await page.goto(`${baseUrl}/experiments?experiment=styles&runs=${run.run_id}`);
  const img = `.sample-sheets img[data-run="${run.run_id}"]`;
  await page.waitForSelector(img, { timeout: 30_000 });
  assert.equal(Number(await page.getAttribute(img, 'data-step')), steps[steps.length - 1], 'the last sheet first');
  await page.$eval('#sheet-step', (e) => { e.value = '0'; e.dispatchEvent(new Event('input', { bubbles: true })); });
  await page.waitForFunction(([sel, s]) => document.querySelector(sel)?.dataset.step === String(s), [img, steps[0]], { timeout: 5_000 });
  assert.equal(await page.getAttribute('.sample-sheets', 'data-step'), String(steps[0]));
  await page.$eval('#sheet-step', (e) => { e.value = '1'; e.dispatchEvent(new Event('input', { bubbles: true })); });
  await page.waitForFunction(([sel, s]) => document.querySelector(sel)?.dataset.step === String(s), [img, steps[1]], { timeout: 5_000 });
  await page.waitForFunction((sel) => { const i = document.querySelector(sel); return i && i.complete && i.naturalWidth > 0; }, img, { timeout: 10_000 });
  await page.screenshot({ path: screenshot.replace(/\.png$/, '-sheets.png'), fullPage: true });

  // The artifact URL serves the PNG itself.
  const src = await page.$eval(img, (i) => i.src);
  const fetched = await page.evaluate(async (u) => {
    const r = await fetch(u);
    const b = new Uint8Array(await r.arrayBuffer());
    return { status: r.status, type: r.headers.get('content-type'), magic: [...b.slice(0, 8)] };
  }, src);
  assert.deepEqual(fetched, { status: 200, type: 'image/png', magic: [137, 80, 78, 71, 13, 10, 26, 10] });
  const refused = await page.request.get(`${baseUrl}/api/runs/${run.run_id}/artifacts/..%2F..%2Ftracking.sqlite`);
  assert.equal(refused.status(), 400);
});

test('no errors in the browser console', () => {
  // The deliberate 400 above is logged by Chromium as a failed resource load; ignore those.
  const real = pageErrors.filter((e) => !/Failed to load resource/.test(e));
  assert.deepEqual(real, []);
});
