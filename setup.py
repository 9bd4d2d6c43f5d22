"""Maps the repository's top-level folders (engine/, services/) into the single import root `instgenie`."""
from setuptools import find_packages, setup

ROOTS = {"instgenie": "instgenie", "instgenie.engine": "engine", "instgenie.services": "services"}

packages, package_dir = [], {}
for package, path in ROOTS.items():
    package_dir[package] = path
    packages.append(package)
    packages += [f"{package}.{sub}" for sub in find_packages(path)]

setup(
    packages=packages,
    package_dir=package_dir,
    package_data={"instgenie.engine": ["assets/*/*.json", "assets/*/*/*.json", "assets/*/*/*.safetensors"],
                  # the web page the gateway's HTTP front serves (plain files, no build step)
                  "instgenie.services.gateway": ["web/*.html", "web/*.js", "web/*.css"]},
)
