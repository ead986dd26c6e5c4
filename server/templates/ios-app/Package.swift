// swift-tools-version: 5.9
// Written by `atelier export ios-app` (Atelier {{ATELIER_VERSION}}). An app package in the format
// Xcode and Swift Playgrounds open directly: File > Open… this folder, pick a device, Run.

import PackageDescription
import AppleProductTypes

let package = Package(
    name: "{{APP_NAME}}",
    platforms: [
        .iOS("{{IOS_MIN}}")
    ],
    products: [
        .iOSApplication(
            name: "{{APP_NAME}}",
            targets: ["AppModule"],
            bundleIdentifier: "{{BUNDLE_ID}}",
            displayVersion: "1.0",
            bundleVersion: "1",
            appIcon: .placeholder(icon: .palette),
            accentColor: .presetColor(.indigo),
            supportedDeviceFamilies: [
                .pad,
                .phone
            ],
            supportedInterfaceOrientations: [
                .portrait,
                .landscapeRight,
                .landscapeLeft,
                .portraitUpsideDown(.when(deviceFamilies: [.pad]))
            ],
        )
    ],
    dependencies: [
        // Apple's Core ML Stable Diffusion pipeline, pinned to a released tag.
        .package(url: "https://github.com/apple/ml-stable-diffusion.git", exact: "{{SD_VERSION}}")
    ],
    targets: [
        .executableTarget(
            name: "AppModule",
            dependencies: [
                .product(name: "StableDiffusion", package: "ml-stable-diffusion")
            ],
            path: "App"{{RESOURCES}}
        )
    ]
)
