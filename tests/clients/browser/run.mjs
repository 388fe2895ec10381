// Serves page.html and MQTT.js over HTTP, opens the page in headless Chromium (Debian's,
// through playwright-core), and reports what the page shows: `subscribed` once the device
// subscribed, then one JSON line per message in the page's list, read from the DOM.
// A screenshot of the page is written after each message.
//
//   node run.mjs --url ws://127.0.0.1:8083/mqtt --id DEVICE --token TOKEN --screenshot out.png
import http from "node:http";
import fs from "node:fs";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const arg = (name) => {
  const i = process.argv.indexOf(`--${name}`);
  if (i < 0) throw new Error(`--${name} is required`);
  return process.argv[i + 1];
};
const files = {
  "/": ["page.html", "text/html"],
  "/mqtt.min.js": ["node_modules/mqtt/dist/mqtt.min.js", "text/javascript"],
};
const server = http.createServer((req, res) => {
  const file = files[req.url];
  if (!file) {
    res.writeHead(404).end();
    return;
  }
  res.writeHead(200, { "content-type": file[1] });
  fs.createReadStream(path.join(here, file[0])).pipe(res);
});
await new Promise((ok) => server.listen(0, "127.0.0.1", ok));
const page_url = `http://127.0.0.1:${server.address().port}/#` +
  new URLSearchParams({ url: arg("url"), id: arg("id"), token: arg("token") });

const browser = await chromium.launch({
  executablePath: process.env.HERALD_CHROMIUM || "/usr/bin/chromium",
  args: ["--no-sandbox", "--headless=new"],
});
const page = await browser.newPage();
page.on("console", (m) => console.error(`page: ${m.text()}`));
await page.goto(page_url);
await page.waitForFunction(
  () => document.getElementById("status").textContent !== "starting" &&
    document.getElementById("status").textContent !== "connected",
  null, { timeout: 20000 });
const state = await page.textContent("#status");
if (state !== "subscribed") {
  console.error(`device not subscribed: ${state}`);
  process.exit(2);
}
console.log("subscribed");
let seen = 0;
for (;;) {
  await page.waitForFunction((n) => document.querySelectorAll("#messages li").length > n,
    seen, { timeout: 0 });
  const items = await page.$$eval("#messages li", (lis) =>
    lis.map((li) => ({ id: li.dataset.id, user_id: li.dataset.userId,
      seq: Number(li.dataset.seq), data: JSON.parse(li.textContent) })));
  await page.screenshot({ path: arg("screenshot") });
  for (const item of items.slice(seen)) console.log(JSON.stringify(item));
  seen = items.length;
}
