// Drives herald's admin console (/admin) in headless Chromium (Debian's, through
// playwright-core) for tests/admin.rs, step by step. Prints one line per step, as
// `<step> <json>`, and reads what it needs from the test on stdin (`message <message id>
// <device id>`). Screenshots go to --shots.
//
//   node admin.mjs --base http://127.0.0.1:8080 --token ADMIN --shots DIR
import path from "node:path";
import readline from "node:readline";
import { chromium } from "playwright-core";

const arg = (name) => {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) throw new Error(`--${name} is required`);
  return process.argv[i + 1];
};
const base = arg("base");
const shots = arg("shots");
const say = (step, value) => console.log(`${step} ${JSON.stringify(value ?? {})}`);
const shot = (page, name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });

const input = readline.createInterface({ input: process.stdin });
const lines = input[Symbol.asyncIterator]();
const ask = async () => (await lines.next()).value;

const browser = await chromium.launch({
  executablePath: process.env.HERALD_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--headless=new"],
});
const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
page.on("console", (m) => console.error(`page: ${m.text()}`));
page.on("pageerror", (e) => console.error(`page error: ${e.message}`));
const urls = [];
page.on("request", (r) => urls.push(r.url()));

// 1. Log in with the admin token.
await page.goto(`${base}/admin`);
await page.waitForSelector("#login:not([hidden])");
await shot(page, "login");
await page.fill("#token", "not the token");
await page.click("#login-form button[type=submit]");
await page.waitForFunction(() => document.getElementById("login-error").textContent !== "");
const refused = await page.textContent("#login-error");
await page.fill("#token", arg("token"));
await page.click("#login-form button[type=submit]");
await page.waitForSelector("#tabs:not([hidden])");
const cookies = await page.context().cookies();
const session = cookies.find((c) => c.name === "herald_admin") || {};
say("logged-in", {
  refused,
  http_only: session.httpOnly,
  same_site: session.sameSite,
  cookie_readable_by_page: await page.evaluate(() => document.cookie.includes("herald_admin")),
});

// 2. The overview updates once a second: count samples over five seconds.
await page.waitForFunction(() => Number(document.body.dataset.samples || 0) >= 2, null, { timeout: 15000 });
const before = await page.evaluate(() => Number(document.body.dataset.samples));
const t0 = Date.now();
await page.waitForTimeout(5000);
const after = await page.evaluate(() => Number(document.body.dataset.samples));
const charts = await page.$$eval("#charts .chart canvas", (c) => c.length);
const acceptedBefore = Number(await page.getAttribute("#fig-accepted_total", "data-value"));
say("overview", {
  updates: after - before,
  seconds: (Date.now() - t0) / 1000,
  charts,
  accepted_total: acceptedBefore,
});

// 3. Create an app; its credentials are shown once.
await page.click("#tabs button[data-tab=apps]");
await page.fill("#app-name", "browser-app");
await page.click("#app-form button[type=submit]");
await page.waitForSelector("#created-client-secret");
const created = {
  app_id: (await page.textContent("#created-app-id")).trim(),
  client_id: (await page.textContent("#created-client-id")).trim(),
  client_secret: (await page.textContent("#created-client-secret")).trim(),
};
await page.waitForSelector(`#app-table tr[data-app-id="${created.app_id}"]`);
await shot(page, "apps");
say("app", created);

// 3b. Rotate its secret (confirming the dialog): the new one is shown once.
page.once("dialog", (d) => d.accept());
await page.click(`#app-table tr[data-app-id="${created.app_id}"] button.rotate`);
await page.waitForSelector("#rotated-client-secret");
say("rotated", { client_secret: (await page.textContent("#rotated-client-secret")).trim() });

// 3c. Set two of its limits; the rest stay at the deployment's defaults.
await page.click(`#app-table tr[data-app-id="${created.app_id}"] button.limits`);
await page.waitForSelector("#limits-form");
await page.fill("#limits-form input[name=pushes_per_s]", "7");
await page.fill("#limits-form input[name=max_devices]", "3");
await page.click("#limits-form button[type=submit]");
await page.waitForSelector("#limits-form .limits-status.saved");
await shot(page, "limits");
say("limits", { status: (await page.textContent("#limits-form .limits-status")).trim() });

// 4. The test pushes through the REST API and a device acknowledges; then the
// message's timeline shows it delivered and acked.
const [, messageId, deviceId] = (await ask()).split(" ");
await page.click("#tabs button[data-tab=messages]");
await page.fill("#message-id", messageId);
await page.click("#message-form button[type=submit]");
await page.waitForSelector("#timeline tr[data-type=DeviceAcked]", { timeout: 20000 });
const types = await page.$$eval("#timeline tbody tr", (rows) => rows.map((r) => r.dataset.type));
await shot(page, "timeline");
say("timeline", {
  types,
  counts: (await page.textContent("#message-counts")).trim(),
  state: (await page.textContent("#message-state")).trim(),
});

// 5. The device's presence and (empty, all acknowledged) inbox.
await page.click("#tabs button[data-tab=devices]");
await page.fill("#device-id", deviceId);
await page.click("#device-form button[type=submit]");
await page.waitForSelector("#presence");
await shot(page, "device");
say("device", {
  presence: (await page.textContent("#presence")).trim(),
  inbox_rows: await page.$$eval("#inbox tbody tr", (r) => r.length),
});

// 6. Back on the overview, the counters have moved.
await page.click("#tabs button[data-tab=overview]");
await page.waitForFunction(
  (n) => Number(document.getElementById("fig-accepted_total").dataset.value) > n,
  acceptedBefore,
  { timeout: 20000 });
await shot(page, "overview");
say("overview-moved", {
  accepted_total: Number(await page.getAttribute("#fig-accepted_total", "data-value")),
  acked_total: Number(await page.getAttribute("#fig-acked_total", "data-value")),
});

// 7. Log out: the admin API refuses the page from then on.
await page.click("#logout");
await page.waitForSelector("#login:not([hidden])");
const status = await page.evaluate(async () => (await fetch("/v1/admin/apps")).status);
say("logged-out", { status, token_in_a_url: urls.some((u) => u.includes(arg("token"))) });
await browser.close();
process.exit(0);
