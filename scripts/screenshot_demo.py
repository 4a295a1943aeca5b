"""Screenshot the demo page (docs/demo.png) with a grid sampled from a checkpoint, in Debian's headless chromium.

    python scripts/screenshot_demo.py [--checkpoint mnist] [--out docs/demo.png]

Needs chromium and chromium-driver (apt) and selenium (the dev extra); the browser and driver are the system's,
so nothing is downloaded.
"""

import argparse
import shutil
import threading

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from farmer.demo import DemoApp, make_server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="mnist")
    parser.add_argument("--out", default="docs/demo.png")
    parser.add_argument("--classes", default="0-9")
    parser.add_argument("--count", default="2", help="images per class")
    parser.add_argument("--guidance", default="2.5")
    args = parser.parse_args()

    server = make_server(DemoApp.load(args.checkpoint), "127.0.0.1", 0, quiet=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        wait = WebDriverWait(driver, 120)
        driver.get(server.url)
        wait.until(lambda d: d.find_element(By.ID, "card").text)  # the model card loaded
        for element, value in (("classes", args.classes), ("count", args.count), ("guidance", args.guidance)):
            field = driver.find_element(By.ID, element)
            field.clear()
            field.send_keys(value)
        driver.find_element(By.ID, "sample-btn").click()
        grid = driver.find_element(By.ID, "grid")
        wait.until(lambda d: grid.get_attribute("data-tiles"))  # the sampled grid arrived
        driver.save_screenshot(args.out)
    finally:
        driver.quit()
        server.shutdown()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
