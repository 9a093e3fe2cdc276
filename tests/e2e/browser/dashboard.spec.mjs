#!/usr/bin/env node
// Browser end-to-end check of the gateway's operator page (/dashboard) in headless Chromium.
//
// Steps: open /dashboard (the login form), log in with the token, see the kernel KERNEL_ID (with its user shown
// as literal text and its "where"), see the page refresh itself from /dashboard/data, screenshot it, click the
// kernel's "Shut down" button (accepting the confirm dialog), and see the kernel's row disappear while
// KEEP_KERNEL_ID stays; interrupt and restart KEEP_KERNEL_ID with its buttons; screenshot again. The driving
// test then checks GET /api/kernels itself.
// No alert() may ever open: a hostile user name must stay text.
//
// Environment:
//   GATEWAY_URL      base URL of the gateway, e.g. http://127.0.0.1:8888   (required)
//   GATEWAY_TOKEN    its token                                             (required)
//   KERNEL_ID        the kernel to shut down from the page                 (required)
//   KEEP_KERNEL_ID   a kernel that must stay on the page                   (required)
//   KERNEL_USER      the user name KERNEL_ID was started for               (required)
//   SCREENSHOT_DIR   where dashboard.png (kernels shown) and dashboard-after-shutdown.png go; on failure
//                    dashboard-failure.png                                 (required)
//   CHROMIUM_PATH    browser binary (default /usr/bin/chromium)
//   STEP_TIMEOUT_MS  timeout of each wait (default 30000); TOTAL_TIMEOUT_MS watchdog (default 120000)
//
// Exits 0 on success; on failure prints "FAIL: <step>: <reason>" and exits 1.
// Install the browser and node_modules with tests/services/install-browser.sh.

import fs from 'node:fs';
import path from 'node:path';

const INSTALL_HINT = 'run tests/services/install-browser.sh (installs Debian chromium and runs npm ci in tests/e2e/browser)';
const env = process.env;
const GATEWAY_URL = (env.GATEWAY_URL || '').replace(/\/+$/, '');
const { GATEWAY_TOKEN = '', KERNEL_ID = '', KEEP_KERNEL_ID = '', KERNEL_USER = '', SCREENSHOT_DIR = '' } = env;
const CHROMIUM_PATH = env.CHROMIUM_PATH || '/usr/bin/chromium';
const STEP_TIMEOUT = Number(env.STEP_TIMEOUT_MS || 30000);
const TOTAL_TIMEOUT = Number(env.TOTAL_TIMEOUT_MS || 120000);
const CHROMIUM_ARGS = [
  '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
];

const t0 = Date.now();
const log = (msg) => console.log(`[${((Date.now() - t0) / 1000).toFixed(1).padStart(5)}s] ${msg}`);

if (!GATEWAY_URL || !GATEWAY_TOKEN || !KERNEL_ID || !KEEP_KERNEL_ID || !SCREENSHOT_DIR) {
  console.error('FAIL: setup: GATEWAY_URL, GATEWAY_TOKEN, KERNEL_ID, KEEP_KERNEL_ID and SCREENSHOT_DIR must be set');
  process.exit(1);
}
let chromium;
try {
  ({ chromium } = await import('playwright-core'));
} catch (err) {
  console.error(`FAIL: setup: cannot import playwright-core (${err.message}); ${INSTALL_HINT}`);
  process.exit(1);
}

let step = 'launch chromium';
let browser;
let page;
const problems = []; // console errors, page errors, CSP violations, unexpected dialogs
let dataRefreshes = 0; // /dashboard/data answers with 200: the page's own refresh, with the cookie and XSRF header

const row = (id) => page.locator(`#kernels tbody tr[data-kernel-id="${id}"]`);
const shot = async (name) => {
  const file = path.join(SCREENSHOT_DIR, name);
  fs.mkdirSync(SCREENSHOT_DIR, { recursive: true });
  await page.screenshot({ path: file, fullPage: true, timeout: 10000 });
  log(`screenshot: ${file}`);
};

async function run() {
  browser = await chromium.launch({ executablePath: CHROMIUM_PATH, headless: true, args: CHROMIUM_ARGS });
  const context = await browser.newContext({ viewport: { width: 1400, height: 800 } });
  page = await context.newPage();
  page.setDefaultTimeout(STEP_TIMEOUT);
  page.on('console', (m) => { if (m.type() === 'error') problems.push(`console: ${m.text().slice(0, 300)}`); });
  page.on('pageerror', (e) => problems.push(`pageerror: ${e.message.slice(0, 300)}`));
  page.on('response', (r) => { if (/\/dashboard\/data$/.test(r.url()) && r.status() === 200) dataRefreshes += 1; });
  page.on('dialog', async (d) => {
    if (d.type() !== 'confirm') problems.push(`unexpected ${d.type()} dialog: ${d.message()}`);
    log(`dialog (${d.type()}): ${d.message()}`);
    await d.accept();
  });

  step = 'open /dashboard: the login form';
  const first = await page.goto(`${GATEWAY_URL}/dashboard`);
  if (first.status() !== 401) throw new Error(`expected 401 with the login form, got ${first.status()}`);
  await page.locator('#login-message').waitFor();
  log(`login form: ${JSON.stringify(await page.locator('#login-message').innerText())}`);

  step = 'log in with the token';
  await page.fill('#token', GATEWAY_TOKEN);
  await Promise.all([page.waitForURL(`${GATEWAY_URL}/dashboard`), page.click('button[type=submit]')]);
  if ((await page.content()).includes(GATEWAY_TOKEN)) throw new Error('the page holds the gateway token');
  // the login form came with its 401, which Chromium logs as a failed resource: expected, so not a problem
  problems.splice(0, problems.length, ...problems.filter((p) => !/status of 401/.test(p)));

  step = 'see both kernels';
  await row(KERNEL_ID).waitFor();
  await row(KEEP_KERNEL_ID).waitFor();
  const cells = await row(KERNEL_ID).locator('td').allInnerTexts();
  log(`row of ${KERNEL_ID}: ${JSON.stringify(cells)}`);
  if (cells[4] !== KERNEL_USER) throw new Error(`user cell ${JSON.stringify(cells[4])}, expected ${JSON.stringify(KERNEL_USER)}`);
  if (!/^pid \d+ on \S+$/.test(cells[3])) throw new Error(`where cell ${JSON.stringify(cells[3])}`);
  if (!/idle/.test(cells[5])) throw new Error(`state cell ${JSON.stringify(cells[5])}`);
  if ((await page.locator('#kernels img').count()) !== 0) throw new Error('markup from a user name was rendered');

  step = 'see the page refresh itself';
  // the next refresh (every 2 s) answered 200: the script sends the cookie and the XSRF header the API accepts
  await page.waitForResponse((r) => /\/dashboard\/data$/.test(r.url()) && r.status() === 200);
  const charts = await page.locator('#charts svg').count();
  if (charts < 2) throw new Error(`expected the start-duration and start charts, found ${charts} SVG charts`);
  log(`${dataRefreshes} refreshes, ${charts} charts, status ${JSON.stringify(await page.locator('#status').innerText())}`);
  await shot('dashboard.png');

  step = 'shut the kernel down from the page';
  await row(KERNEL_ID).locator('button.shutdown').click();
  await row(KERNEL_ID).waitFor({ state: 'detached' });
  await row(KEEP_KERNEL_ID).waitFor();
  const message = await page.locator('#message').innerText();
  if (message.trim()) throw new Error(`the page reported: ${message}`);
  log(`kernel ${KERNEL_ID} is gone from the page; ${KEEP_KERNEL_ID} stays`);

  step = 'interrupt and restart the other kernel from the page';
  for (const [action, status] of [['interrupt', 204], ['restart', 200]]) {
    const [resp] = await Promise.all([
      page.waitForResponse((r) => r.url().endsWith(`/api/kernels/${KEEP_KERNEL_ID}/${action}`), { timeout: 90000 }),
      row(KEEP_KERNEL_ID).locator(`button.${action}`).click(),
    ]);
    if (resp.status() !== status) throw new Error(`${action} answered ${resp.status()}, expected ${status}`);
  }
  // the refresh after the restart's answer shows the kernel idle again
  await page.waitForResponse((r) => /\/dashboard\/data$/.test(r.url()) && r.status() === 200);
  await row(KEEP_KERNEL_ID).locator('.state-idle').waitFor();
  log(`kernel ${KEEP_KERNEL_ID} interrupted and restarted from the page, idle again`);
  await shot('dashboard-after-shutdown.png');
  if (problems.length) throw new Error(`problems in the page: ${problems.join(' | ')}`);
}

let failed = null;
const watchdog = setTimeout(() => { failed = failed || new Error(`total timeout ${TOTAL_TIMEOUT} ms`); finish(); }, TOTAL_TIMEOUT);
let finishing = false;

async function finish() {
  if (finishing) return;
  finishing = true;
  clearTimeout(watchdog);
  if (failed) {
    try {
      if (page) await shot('dashboard-failure.png');
    } catch (err) {
      console.error(`(screenshot failed: ${err.message})`);
    }
    console.error(`FAIL: ${step}: ${failed.message.split('\n')[0]}\n${problems.join('\n')}`);
  } else {
    log('PASS: login, kernel shown, refreshes, shut down, interrupt and restart from the page');
  }
  try {
    if (browser) await Promise.race([browser.close(), new Promise((r) => setTimeout(r, 10000))]);
  } catch { /* browser already gone */ }
  process.exit(failed ? 1 : 0);
}

try {
  await run();
} catch (err) {
  failed = err;
}
await finish();
