// diffgentor dashboard: live progress without a reload. Rows, tiles and headers that are still
// moving carry data-live="1" and their batch or job id; every few seconds (data-poll-ms on
// <body>) one request per kind asks for their current state and the numbers, bars, badges and
// thumbnails are updated in place. Plain JavaScript, no build step, no inline script (CSP).
"use strict";
(function () {
  const body = document.body;
  const pollMs = Number(body.dataset.pollMs || 2000);
  const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
  let busy = false;

  async function getJSON(url) {
    const response = await fetch(url, {
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json" },
    });
    if (!response.ok) {
      throw new Error(url + ": HTTP " + response.status);
    }
    return response.json();
  }

  function live(selector) {
    return Array.from(document.querySelectorAll(selector + "[data-live='1']"));
  }

  function setText(root, selector, value) {
    const element = root.querySelector(selector);
    if (element && element.textContent !== String(value)) {
      element.textContent = String(value);
    }
  }

  const SVG = "http://www.w3.org/2000/svg";

  function updateBatch(element, data) {
    const svg = element.querySelector("svg.bar");
    if (svg) {
      svg.querySelectorAll("rect.seg").forEach((rect) => rect.remove());
      for (const segment of data.segments) {
        if (segment.width > 0) {
          const rect = document.createElementNS(SVG, "rect");
          rect.setAttribute("class", "seg " + segment.status);
          rect.setAttribute("x", segment.x);
          rect.setAttribute("width", segment.width);
          rect.setAttribute("height", "12");
          svg.appendChild(rect);
        }
      }
      svg.setAttribute("aria-label", data.counts_text);
    }
    setText(element, "[data-role='counts']", data.counts_text);
    setText(element, "[data-role='finished']", data.total - data.unfinished);
    setText(element, "[data-role='total']", data.total);
    setText(element, "[data-role='throughput']", data.throughput);
    setText(element, "[data-role='eta']", data.eta);
    if (data.unfinished === 0) {
      element.dataset.live = "0";
    }
  }

  function updateJob(element, data) {
    const badge = element.querySelector("[data-role='badge']");
    if (badge) {
      badge.className = "badge " + data.status;
      const stopping = data.cancel_requested && data.status === "running" ? " (stopping)" : "";
      badge.textContent = data.status + stopping;
    }
    if (element.classList.contains("tile")) {
      element.classList.remove(...STATUSES);
      element.classList.add(data.status);
    }
    const progress = element.querySelector("[data-role='progress']");
    if (progress) {
      progress.hidden = data.status !== "running";
      const bar = progress.querySelector("progress");
      if (bar) {
        bar.max = data.total || 1;
        bar.value = data.step;
      }
      setText(progress, "[data-role='steps']", data.step + "/" + data.total);
    }
    const thumb = element.querySelector("[data-role='thumb']");
    if (thumb && data.thumb && !thumb.querySelector("img")) {
      const image = document.createElement("img");
      image.src = data.thumb;
      image.alt = "";
      thumb.replaceChildren(image);
    }
    if (!data.live) {
      element.dataset.live = "0";
      if (element.dataset.reloadWhenDone === "1") {
        window.location.reload(); // the job page: show its images, timeline and error
      }
    }
  }

  async function refresh(selector, url, key, update) {
    const elements = live(selector);
    if (!elements.length) {
      return;
    }
    const attribute = key === "batches" ? "batchId" : "jobId";
    const ids = [...new Set(elements.map((element) => element.dataset[attribute]))];
    const data = await getJSON(url + "?ids=" + ids.join(","));
    for (const element of elements) {
      const item = data[key][element.dataset[attribute]];
      if (item) {
        update(element, item);
      }
    }
  }

  async function tick() {
    if (busy || document.hidden) {
      return;
    }
    busy = true;
    try {
      await refresh("[data-batch-id]", "/api/batches", "batches", updateBatch);
      await refresh("[data-job-id]", "/api/jobs", "jobs", updateJob);
      body.dataset.updates = String(Number(body.dataset.updates || 0) + 1);
      delete body.dataset.updateError;
    } catch (error) {
      body.dataset.updateError = String(error); // shown by the stylesheet as a small banner
    } finally {
      busy = false;
    }
  }

  if (live("[data-batch-id]").length || live("[data-job-id]").length) {
    window.setInterval(tick, pollMs);
  }
})();
