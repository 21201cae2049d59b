// Base vs adapted: POST /v1/generate with compare_base and show both PNGs side by side.
"use strict";

const KEY_STORE = "sur-api-key";

function byId(id) {
  return document.getElementById(id);
}

function numberOrNull(id) {
  const value = byId(id).value.trim();
  return value === "" ? null : Number(value);
}

function setStatus(text, isError) {
  const status = byId("status");
  status.textContent = text;
  status.className = isError ? "error" : "";
}

async function generate(event) {
  event.preventDefault();
  const key = byId("api-key").value;
  sessionStorage.setItem(KEY_STORE, key);
  const body = {
    prompt: byId("prompt").value,
    negative_prompt: byId("negative-prompt").value,
    steps: numberOrNull("steps"),
    guidance: numberOrNull("guidance"),
    seed: numberOrNull("seed"),
    compare_base: true,
  };
  byId("generate").disabled = true;
  setStatus("Generating…", false);
  try {
    const response = await fetch("/v1/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", "X-API-Key": key },
      body: JSON.stringify(body),
    });
    const data = await response.json();
    if (!response.ok) {
      setStatus(`Error ${response.status}: ${data.message || data.detail}`, true);
      return;
    }
    byId("base-image").src = `data:image/png;base64,${data.base_png_base64}`;
    byId("adapted-image").src = `data:image/png;base64,${data.adapted_png_base64}`;
    setStatus(`Version ${data.version}, seed ${data.seed}, ${data.steps} steps.`, false);
  } catch (error) {
    setStatus(`Request failed: ${error}`, true);
  } finally {
    byId("generate").disabled = false;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  byId("api-key").value = sessionStorage.getItem(KEY_STORE) || "";
  byId("generate-form").addEventListener("submit", generate);
});
