// nfsd-nerf report page: synced turntables, preview slider, sortable tables, model status.
// Inlined into every page; makes no request (the page must work from file:// with no network).
(function () {
  "use strict";

  // Turntables of one group play in sync: the first video leads, the others follow its phase
  // (as a fraction of the turn, so videos of different lengths still line up).
  function syncGroup(group) {
    var videos = Array.prototype.slice.call(group.querySelectorAll("video"));
    if (!videos.length) return;
    var button = group.querySelector("button.playpause");
    function lead() { return videos.find(function (v) { return v.readyState >= 1 && v.duration > 0; }); }
    function follow() {
      var first = lead();
      if (!first) return;
      var phase = first.currentTime / first.duration;
      videos.forEach(function (v) {
        if (v === first || !(v.duration > 0)) return;
        var target = phase * v.duration;
        if (Math.abs(v.currentTime - target) > 0.08) v.currentTime = target;
        if (first.paused !== v.paused) { if (first.paused) v.pause(); else v.play().catch(function () {}); }
      });
    }
    setInterval(follow, 400);
    if (button) {
      button.addEventListener("click", function () {
        var pause = !videos[0].paused;
        videos.forEach(function (v) { if (pause) v.pause(); else v.play().catch(function () {}); });
        button.textContent = pause ? "play" : "pause";
      });
    }
    var select = group.querySelector("select.mode");
    if (select) {
      select.addEventListener("change", function () {
        videos.forEach(function (v) {
          var src = v.getAttribute("data-" + select.value);
          if (src) { v.src = src; v.play().catch(function () {}); }
        });
      });
    }
  }

  // Previews: the slider (and the strip of thumbnails) choose the image shown large.
  function previews(box) {
    var big = box.querySelector("img.current"), slider = box.querySelector("input[type=range]");
    var label = box.querySelector(".preview-step"), thumbs = box.querySelectorAll(".strip img");
    function show(i) {
      var t = thumbs[i];
      big.src = t.getAttribute("src");
      label.textContent = "step " + t.getAttribute("data-step");
      slider.value = i;
      thumbs.forEach(function (x, k) { x.classList.toggle("selected", k === i); });
    }
    slider.addEventListener("input", function () { show(parseInt(slider.value, 10)); });
    thumbs.forEach(function (t, i) { t.addEventListener("click", function () { show(i); }); });
  }

  // Results tables: a click on a header sorts by that column (numbers as numbers, empty cells last).
  function sortable(table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, col) {
      th.addEventListener("click", function () {
        var ascending = th.getAttribute("aria-sort") !== "ascending";
        heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
        th.setAttribute("aria-sort", ascending ? "ascending" : "descending");
        var body = table.tBodies[0], rows = Array.prototype.slice.call(body.rows);
        function key(row) {
          var cell = row.cells[col], raw = cell.getAttribute("data-sort");
          return raw === null ? cell.textContent.trim() : raw;
        }
        rows.sort(function (a, b) {
          var x = key(a), y = key(b);
          if (x === "" || y === "") return x === y ? 0 : (x === "" ? 1 : -1);
          var nx = Number(x), ny = Number(y), cmp;
          cmp = (!isNaN(nx) && !isNaN(ny)) ? nx - ny : x.localeCompare(y);
          return ascending ? cmp : -cmp;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  }

  function viewerStatus(viewer) {
    var status = document.getElementById(viewer.getAttribute("data-status"));
    viewer.addEventListener("load", function () {
      viewer.setAttribute("data-loaded", "true");
      if (status) status.textContent = "drag to turn, scroll to zoom";
    });
    viewer.addEventListener("error", function (e) {
      viewer.setAttribute("data-error", "true");
      if (status) status.textContent = "the model could not be shown: " + ((e.detail && e.detail.type) || "error");
    });
  }

  document.querySelectorAll("[data-sync]").forEach(syncGroup);
  document.querySelectorAll(".previews").forEach(previews);
  document.querySelectorAll("table.results").forEach(sortable);
  document.querySelectorAll("model-viewer").forEach(viewerStatus);
})();
