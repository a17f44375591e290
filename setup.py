"""Packaging for neurolm_nb: every setting is read from settings.ini (the nbdev 2 way)."""
from configparser import ConfigParser

import setuptools
config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

requirements = cfg.get("requirements", "").split()
dev_requirements = cfg.get("dev_requirements", "").split()
interop_requirements = cfg.get("interop_requirements", "").split()  # braindecode (brings torchaudio)
book_requirements = cfg.get("book_requirements", "").split()  # Sphinx + myst-nb + sphinx-book-theme (make book)
console_scripts = cfg.get("console_scripts", "").split()

setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    license="MIT",
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=[cfg["lib_name"], cfg["lib_name"] + ".*"]),
    include_package_data=True,
    python_requires=">=" + cfg["min_python"],
    install_requires=requirements,
    extras_require={"dev": dev_requirements, "interop": interop_requirements,
                    "book": book_requirements},
    entry_points={"console_scripts": console_scripts, "nbdev": [f"{cfg['lib_name']}={cfg['lib_name']}._modidx:d"]},
    keywords=cfg["keywords"],
    classifiers=["Programming Language :: Python :: 3", "License :: OSI Approved :: MIT License"],
    zip_safe=False,
)
