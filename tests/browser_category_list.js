// The real-browser half of tests/test_comfy_browser.py: headless Debian chromium, driven by npm's
// playwright-core, on the real ComfyUI frontend of a running server with this pack.
// SPDX-License-Identifier: GPL-3.0-or-later
//
// Usage: NODE_PATH=<folder holding playwright-core> node tests/browser_category_list.js PLAN.json
// PLAN: { url, chromium, workflow (UI-format JSON path), widgets: [[node type, widget, value]...],
//         big_bank, small_bank, big_query, chinese_query, chinese_pick, latin_query, latin_pick, screenshot }
// Prints one JSON line: what the page showed at each step, the saved category value and the queued prompt id.
const fs = require("fs");
const { chromium } = require("playwright-core");

function log(...args) { console.error("[browser]", ...args); }

async function main() {
  const plan = JSON.parse(fs.readFileSync(process.argv[2], "utf8"));
  const browser = await chromium.launch({
    executablePath: plan.chromium,
    args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
           "--disable-background-networking", "--disable-component-update"],
  });
  const result = { errors: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
    page.on("pageerror", (e) => result.errors.push(String(e)));
    await page.goto(plan.url, { waitUntil: "networkidle", timeout: 180000 });
    await page.waitForFunction(() => window.app && window.app.graph && window.productbgCategoryList, null,
                               { timeout: 180000 });
    await page.keyboard.press("Escape");
    await page.addStyleTag({ content: ".p-toast, .p-dialog-mask, [class*='banner'] { display: none !important; }" });
    const workflow = JSON.parse(fs.readFileSync(plan.workflow, "utf8"));
    result.loaded = await page.evaluate(async ({ workflow, widgets }) => {
      await window.app.loadGraphData(workflow);
      for (const [type, name, value] of widgets)
        for (const node of window.app.graph._nodes.filter((n) => n.type === type)) {
          const w = node.widgets.find((w) => w.name === name);
          if (w) w.value = value;
        }
      return window.app.graph._nodes.map((n) => n.type);
    }, { workflow: workflow, widgets: plan.widgets });

    // The Category node's widget, clicked where a person clicks it on the canvas.
    async function clickCategory() {
      const at = await page.evaluate(async () => {
        const app = window.app, canvas = app.canvas;
        const node = app.graph._nodes.find((n) => n.type === "ProductBGCategory");
        canvas.ds.scale = 1;
        canvas.ds.offset = [-node.pos[0] + 200, -node.pos[1] + 200];
        canvas.setDirty(true, true);
        canvas.draw(true, true);
        await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
        const w = node.widgets.find((w) => w.name === "category");
        const [x, y] = canvas.ds.convertOffsetToCanvas([node.pos[0] + node.size[0] / 2,
                                                       node.pos[1] + (w.y ?? w.last_y) + 10]);
        const rect = canvas.canvas.getBoundingClientRect();
        const ratio = rect.width / canvas.canvas.width;
        return { x: rect.left + x * ratio, y: rect.top + y * ratio };
      });
      await page.mouse.click(at.x, at.y);
      await page.waitForSelector("#productbg-category-picker .productbg-category-row", { timeout: 30000 });
    }
    const rows = () => page.$$eval("#productbg-category-picker .productbg-category-row", (els) => els.map((e) => e.dataset.name));
    const count = () => page.$eval("#productbg-category-picker .productbg-category-count", (e) => e.textContent);
    async function type(text) {
      await page.fill("#productbg-category-picker .productbg-category-filter", "");
      const t0 = Date.now();
      await page.type("#productbg-category-picker .productbg-category-filter", text);
      await page.evaluate(() => new Promise((r) => requestAnimationFrame(r)));
      return Date.now() - t0;
    }
    const setBank = (name) => page.evaluate((name) => {
      const loader = window.app.graph._nodes.find((n) => n.type === "ProductBGLoadCategoryBank");
      loader.widgets.find((w) => w.name === "bank_name").value = name;
    }, name);

    // 1. A 5,000-category bank: the list opens, only the visible rows are in the page, filtering keeps up.
    await setBank(plan.big_bank);
    await clickCategory();
    result.big = { count: await count(), rows_in_page: (await rows()).length,
                   title: await page.$eval("#productbg-category-picker", (e) => e.dataset.bank) };
    result.big.type_ms = await type(plan.big_query);
    result.big.filtered = await count();
    result.big.filtered_rows_in_page = (await rows()).length;
    await page.keyboard.press("Escape");
    result.big.closed = (await page.$("#productbg-category-picker")) === null;

    // 2. The workflow's own bank: filter by a Chinese substring and pick with the mouse.
    await setBank(plan.small_bank);
    await clickCategory();
    result.small_count = await count();
    await type(plan.chinese_query);
    result.chinese_rows = await rows();
    await page.waitForFunction(() => [...document.querySelectorAll("#productbg-category-picker img.productbg-preview")]
      .some((img) => img.complete && img.naturalWidth > 0), null, { timeout: 30000 });
    result.preview_loaded = true;
    await page.click(`#productbg-category-picker .productbg-category-row[data-name="${plan.chinese_pick}"]`);
    result.after_chinese = await page.evaluate(() => window.app.graph._nodes
      .find((n) => n.type === "ProductBGCategory").widgets.find((w) => w.name === "category").value);

    // 3. A Latin substring in other letter case, picked with the keyboard.
    await clickCategory();
    await type(plan.latin_query);
    result.latin_rows = await rows();
    await page.keyboard.press("Enter");
    result.saved = await page.evaluate(() => {
      const data = window.app.graph.serialize();
      const node = data.nodes.find((n) => n.type === "ProductBGCategory");
      return node.widgets_values[0];
    });
    if (plan.screenshot) {
      await clickCategory();
      await type(plan.latin_query.slice(0, 1));
      await page.screenshot({ path: plan.screenshot });
      await page.keyboard.press("Escape");
    }

    // 4. Queue the workflow as the Run button does; the prompt id comes from the server's answer.
    const answer = page.waitForResponse((r) => r.url().endsWith("/prompt") && r.request().method() === "POST",
                                        { timeout: 120000 });
    await page.evaluate(() => window.app.queuePrompt(0, 1));
    const response = await answer;
    result.queue_status = response.status();
    result.prompt_id = (await response.json()).prompt_id;
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
}

main().catch((e) => { console.error(e); process.exit(1); });
